"""Checkpoint save and restore time of the paper-size training state, on a local disk and
in a bucket, side by side.

    python -m benchmarks.checkpoint_io [--url gs://BUCKET/PREFIX] [--rounds 3]

Times what a run does: TrainSaver.save plus sealing (Orbax's write, its finalisation and
the checksums of every file), and checkpoint.resume (checksum verification, restore onto
the state's layout, the finiteness check). Without --url (or STORAGE_EMULATOR_HOST) it
starts fake-gcs-server on 127.0.0.1 (requirements-test.txt), so the bucket figures are an
emulator's on this machine: the client's and the protocol's cost, not a real network's.
Rounds alternate local and bucket; the table prints the median of each.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from typing import Any, Iterator


def _state() -> tuple[Any, Any, Any]:
  """(model, state, abstract state) of the paper's x8 recipe (Adam, no EMA), on one CPU."""
  import jax  # pylint: disable=import-outside-toplevel

  from benchmarks import steps  # pylint: disable=import-outside-toplevel
  from spadnet_jax import sharding, trainer  # pylint: disable=import-outside-toplevel
  from spadnet_jax.train_step import (init_state,  # pylint: disable=import-outside-toplevel
                                      make_optimizer)
  cfg = steps.paper_config()
  model = trainer.build_model(cfg)
  tx, _ = make_optimizer(cfg, steps_per_epoch=10_000)
  abstract, shardings = trainer.state_layout(cfg, model, tx, sharding.make_mesh(1))
  def trained_like(rng: jax.Array) -> Any:
    """A state whose Adam moments are not zeros (which compress to nothing), as mid-run."""
    state = init_state(model, tx, rng, ema=False)
    leaves, tree = jax.tree_util.tree_flatten(state.opt_state)
    keys = jax.random.split(rng, len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 1e-3 if x.ndim else x
              for k, x in zip(keys, leaves)]
    return state.replace(opt_state=jax.tree_util.tree_unflatten(tree, leaves))

  state = jax.jit(trained_like, out_shardings=shardings)(jax.random.key(0))
  return model, state, abstract


def _round(directory: str, model: Any, state: Any, abstract: Any) -> tuple[float, float, int]:
  """(save s, restore s, bytes) of one checkpoint under `directory`."""
  import jax  # pylint: disable=import-outside-toplevel

  from spadnet_jax import checkpoint  # pylint: disable=import-outside-toplevel
  saver = checkpoint.TrainSaver(directory, model, batch_size=16, keep=2, async_save=False,
                                stop_on_nonfinite=False, is_main=True)
  start = time.perf_counter()
  saver.save(state, 1, examples_seen=16)
  saver.seal_saved()
  save_s = time.perf_counter() - start
  saver.close()
  start = time.perf_counter()
  restored, _ = checkpoint.resume(directory, None, abstract, lambda _: None, is_main=True)
  jax.block_until_ready(restored)
  restore_s = time.perf_counter() - start
  return save_s, restore_s, checkpoint.step_bytes(directory, 1)


@contextlib.contextmanager
def _bucket(url: str | None) -> Iterator[str]:
  if url:
    yield url.rstrip("/")
    return
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    yield "gs://spadnet-bench"
    return
  from tests.gcs_server import running_server  # pylint: disable=import-outside-toplevel
  with running_server("spadnet-bench") as server:
    os.environ["STORAGE_EMULATOR_HOST"] = server
    yield "gs://spadnet-bench"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--url", default=None, help="gs://BUCKET/PREFIX (default: a local emulator)")
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from spadnet_jax import process_setup  # pylint: disable=import-outside-toplevel
  process_setup.quiet_native_logs([])
  from spadnet_jax.storage import paths  # pylint: disable=import-outside-toplevel
  times: dict[str, list[tuple[float, float, int]]] = {"local disk": [], "bucket": []}
  with _bucket(a.url) as bucket, tempfile.TemporaryDirectory() as local:
    paths.configure_clients()
    model, state, abstract = _state()
    run = f"{bucket}/checkpoint-io-{os.getpid()}"
    for r in range(a.rounds):
      order = ["local disk", "bucket"] if r % 2 == 0 else ["bucket", "local disk"]
      for where in order:
        directory = (os.path.join(local, f"r{r}") if where == "local disk" else f"{run}/r{r}")
        times[where].append(_round(directory, model, state, abstract))
  print(f"paper x8 training state (Adam), {times['local disk'][0][2] / 2**20:.1f} MiB a step; "
        f"median of {a.rounds} rounds; bucket: {a.url or 'fake-gcs-server on 127.0.0.1'}")
  print("| where | save + seal (s) | verify + restore (s) |")
  print("|---|---|---|")
  for where, rows in times.items():
    print(f"| {where} | {statistics.median(r[0] for r in rows):.2f} | "
          f"{statistics.median(r[1] for r in rows):.2f} |")


if __name__ == "__main__":
  main()
