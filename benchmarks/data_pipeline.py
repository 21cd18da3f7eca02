"""Input-pipeline throughput: examples/s of finished training batches on this machine.

    python -m benchmarks.data_pipeline [--batch 8] [--batches 100] [--threads 2]

Builds the synthetic_faces data set (default config) if needed, then times the grain
pipeline (PNG decode, LR synthesis, LR upsampling, heatmaps, flip + rot90 augmentation).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import ml_collections

from spadnet_jax.data import pipeline


def measure(batch: int, batches: int, threads: int, data_dir: str, scale: int,
            kernel: str) -> float:
  cfg = ml_collections.ConfigDict(dict(name="synthetic_faces", data_dir=data_dir,
                                       lr_kernel=kernel, augment_flip=True, augment_rot90=True,
                                       num_threads=threads, prefetch=8))
  it = iter(pipeline.train_dataset(pipeline.Data(cfg), scale, batch, seed=0))
  for _ in range(5):                                     # warm up threads and caches
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
  p.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "spadnet_bench_tfds"))
  args = p.parse_args()
  rows = []
  for kernel in ("pil", "matlab"):
    for threads in args.threads:
      rows.append((kernel, threads, measure(args.batch, args.batches, threads, args.data_dir, 8, kernel)))
  print("\n| LR kernel | threads | batch | examples/s (target >= 200) |\n|---|---|---|---|")
  for kernel, threads, rate in rows:
    print(f"| {kernel} | {threads} | {args.batch} | {rate:.0f} |")


if __name__ == "__main__":
  main()
