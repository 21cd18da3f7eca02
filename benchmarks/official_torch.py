"""The official PyTorch SPADNet, run from a checkout the user fetched, for benchmarks/official.py.

Nothing of the official code is committed here or edited on disk: `load_official` imports it
from the checkout with two run-time shims that torch 2 needs, and nothing else:

1. `torch._thnn` (removed from torch long ago): the official pac.py imports
   `torch._thnn.type2backend` and stores `type2backend[input.type()]` in its autograd
   Functions; their backward passes call the backend's `Im2Col_updateGradInput`, i.e.
   col2im. The shim installs a module whose `type2backend` gives, for any tensor type, a
   backend implementing exactly that with `torch.nn.functional.fold`.
2. Upsampler's convolutions: model/common.py passes `bias=True` positionally into
   `default_conv`'s `stride` parameter, so each up-sampling conv gets `stride=(True, True)`,
   which torch 2's conv2d refuses when called. After the model is built, every Conv2d's
   stride is converted to ints (True -> 1), the stride the official results were made with.

With both, the official x8 model reproduces the project's parity fixture
(../shared/fixtures/official_x8.npz) exactly.

The timed functions run in a child process of benchmarks/official.py, one case and one
torch setting per process (settings: SETTINGS).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import types
from typing import Any, Callable

# A torch setting: (torch.compile mode or None for eager, channels_last memory format).
SETTINGS = {"eager": (None, False), "eager_channels_last": (None, True),
            "compile": ("default", False), "compile_channels_last": ("default", True),
            "compile_max_autotune": ("max-autotune", False)}
LEARNING_RATE = 1e-4        # the paper's Adam learning rate (SPEC.md)


class _Col2Im:
  """The one THNN backend call the official PAC backward passes make (shim 1)."""
  library_state = None

  @staticmethod
  def Im2Col_updateGradInput(state: Any, cols: Any, grad_input: Any, in_h: int, in_w: int,  # pylint: disable=invalid-name
                             kh: int, kw: int, dh: int, dw: int, ph: int, pw: int,
                             sh: int, sw: int) -> None:
    del state
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    out = F.fold(cols, (in_h, in_w), (kh, kw), (dh, dw), (ph, pw), (sh, sw))
    grad_input.resize_(out.shape).copy_(out)


class _AnyTensorType(dict):
  """type2backend for every tensor type string ('torch.FloatTensor', ...)."""

  def __missing__(self, key: str) -> type:
    return _Col2Im


def install_thnn_shim() -> None:
  """Shim 1: a `torch._thnn` module with a working `type2backend` (a no-op if present)."""
  if "torch._thnn" not in sys.modules:
    module = types.ModuleType("torch._thnn")
    module.type2backend = _AnyTensorType()
    sys.modules["torch._thnn"] = module


def fix_conv_strides(net: Any) -> None:
  """Shim 2: the Upsampler convs' `stride=(True, True)` made `(1, 1)`."""
  import torch  # pylint: disable=import-outside-toplevel
  for m in net.modules():
    if isinstance(m, torch.nn.Conv2d):
      m.stride = tuple(int(s) for s in m.stride)


def load_official(checkout: str, scale: int, number: int, hab_num: int) -> Any:
  """The official model (model/unet*.py, as its test.py builds it), with the shims applied."""
  if not os.path.isfile(os.path.join(checkout, "model", "__init__.py")):
    raise FileNotFoundError(f"--official {checkout}: no model/__init__.py there; give a "
                            "checkout of https://github.com/wcy-cs/SPADNet")
  install_thnn_shim()
  sys.path.insert(0, os.path.abspath(checkout))
  import importlib  # pylint: disable=import-outside-toplevel
  name = {8: "unet", 4: "unet4", 16: "unet16"}[scale]
  module = importlib.import_module(f"model.{name}")
  args = argparse.Namespace(scale=scale, n_feats=64, number=number, hab_num=hab_num)
  net = module.make_model(args)
  fix_conv_strides(net)
  return net


def _memory_format(channels_last: bool) -> Any:
  import torch  # pylint: disable=import-outside-toplevel
  return torch.channels_last if channels_last else torch.contiguous_format


def _median_seconds(step: Callable[[], Any], iters: int, sync: Callable[[], None]) -> tuple[float, float]:
  """(seconds of the first call, which compiles under torch.compile; median of `iters`
  calls after a second warm-up call)."""
  t = time.perf_counter()
  step()
  sync()
  first = time.perf_counter() - t
  step()
  sync()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t)
  return first, sorted(times)[len(times) // 2]


def time_case(checkout: str, kind: str, batch: int, setting: str, iters: int, device: str,
              model_size: dict[str, int]) -> dict[str, Any]:
  """Time the official train step (L1 on SR + L1 on heatmap, Adam) or forward pass
  (under torch.inference_mode) at `batch`, in one torch setting."""
  import torch  # pylint: disable=import-outside-toplevel
  mode, channels_last = SETTINGS[setting]
  net = load_official(checkout, **model_size).to(device, memory_format=_memory_format(channels_last))
  gen = torch.Generator().manual_seed(0)
  make = lambda c: torch.rand(batch, c, 128, 128, generator=gen).to(
      device, memory_format=_memory_format(channels_last))
  x, hr, heatmap = make(3), make(3), make(5)
  model = torch.compile(net, mode=mode) if mode else net
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  if kind == "inference":
    net.eval()

    def step() -> Any:
      with torch.inference_mode():
        return model(x)
  else:
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
    l1 = torch.nn.L1Loss()

    def step() -> Any:
      opt.zero_grad(set_to_none=True)
      sr, hm = model(x)
      loss = l1(sr, hr) + l1(hm, heatmap)
      loss.backward()
      opt.step()
      return loss
  first, sec = _median_seconds(step, iters, sync)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
  return {"s_per_step": sec, "images_per_s": batch / sec, "first_call_s": first,
          "peak_memory_gib": peak}


def official_style_predict(checkout: str, pth: str, inputs: str, output: str) -> None:
  """What the official test.py does per image, on a folder of LR faces: build the model,
  torch.load the .pth, then for each PNG: bicubic up to 128x128 (Pillow), net(lr) under
  no_grad at batch 1, save the SR image as PNG (torchvision's save_image rounding)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  state = torch.load(pth, map_location="cpu", weights_only=True)
  number = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("SR_branch1."))
  hab_num = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("hab_branch1."))
  net = load_official(checkout, 8, number, hab_num)
  net.load_state_dict(state)
  net.eval()
  os.makedirs(output, exist_ok=True)
  with torch.no_grad():
    for name in sorted(os.listdir(inputs)):
      lr = Image.open(os.path.join(inputs, name)).convert("RGB").resize((128, 128), Image.BICUBIC)
      x = torch.from_numpy(np.asarray(lr, np.float32) / 255.0).permute(2, 0, 1)[None]
      sr, _ = net(x)
      img = sr[0].mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()
      Image.fromarray(img).save(os.path.join(output, os.path.splitext(name)[0] + ".png"))


@contextlib.contextmanager
def quiet_stdout():
  """The official code prints while it builds; a child's stdout carries only its JSON."""
  saved = sys.stdout
  sys.stdout = open(os.devnull, "w")
  try:
    yield
  finally:
    sys.stdout.close()
    sys.stdout = saved
