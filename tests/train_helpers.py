"""Tiny training configurations and subprocess runners shared by the training tests."""
import os
import re
import subprocess
import sys

from configs import default
from tests.conftest import REPO


def tiny_config(data_dir: str, **overrides):
  c = default.get_config()
  c.model.update(n_feats=4, number=2, reduction=2, pac_impl="fused")
  c.data.update(name="synthetic_faces/tiny", data_dir=data_dir, num_threads=1, prefetch=2,
                augment_flip=True)
  c.update(batch_size=8, num_train_steps=4, log_every=1, eval_every=1000, checkpoint_every=2,
           eval_batch_size=8, num_eval_images=8, num_grid_images=2, async_checkpoints=True)
  for key, value in overrides.items():
    target = c
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return c


def run_train(workdir: str, data_dir: str, *flags: str, devices: int = 1, env=None,
              timeout: int = 600, popen: bool = False):
  """Run train.py in a subprocess on `devices` simulated CPU devices with the tiny config."""
  args = [sys.executable, "train.py", "--config", "tests/tiny_config.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *flags]
  full_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", **(env or {})}
  if popen:
    return subprocess.Popen(args, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def losses(output: str) -> dict[int, float]:
  return {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"^step (\d+)/\d+ loss ([0-9.eE+-]+|nan)", output, re.M)}


def start_processes(workdir: str, data_dir: str, *flags: str, count: int = 2,
                    devices: int = 2) -> list[subprocess.Popen]:
  """Start a `count`-process train.py run on 127.0.0.1 (gloo), each with `devices` CPUs."""
  import portpicker
  port = portpicker.pick_unused_port()
  return [run_train(workdir, data_dir, *flags, f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={count}", f"--process_id={i}", devices=devices, popen=True)
          for i in range(count)]


def wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 300) -> str:
  """Read proc's output until a line starts with `prefix`; returns what was read."""
  import time
  lines, deadline = [], time.time() + timeout
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix) or time.time() > deadline:
      break
  return "".join(lines)
