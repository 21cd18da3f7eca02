"""Multi-host start-up: jax.distributed.initialize from flags or the cluster environment."""
from __future__ import annotations

import os

import jax
from absl import flags, logging


def define_flags() -> None:
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                    "auto: initialise on TPU pods and multi-task SLURM jobs, or when "
                    "--coordinator_address is given.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
  flags.DEFINE_integer("num_processes", None, "Number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a "
                       "process counts as lost; the others then exit (JAX's coordination "
                       "service) instead of waiting for it.")
  flags.DEFINE_integer("initialization_timeout", 300, "Seconds to wait for every process to "
                       "join at start-up.")


def _cluster_detected() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "TPU_WORKER_HOSTNAMES" in os.environ and "," in os.environ["TPU_WORKER_HOSTNAMES"]


def initialize_from_flags() -> None:
  """Call jax.distributed.initialize when the flags or the environment ask for it."""
  f = flags.FLAGS
  explicit = f.coordinator_address is not None
  if f.distributed == "off" or (f.distributed == "auto" and not explicit and not _cluster_detected()):
    return
  timeouts = dict(heartbeat_timeout_seconds=f.heartbeat_timeout,
                  initialization_timeout=f.initialization_timeout)
  if explicit:
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
