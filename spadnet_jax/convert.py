"""Official PyTorch SPADNet weights <-> spadnet-jax variables.

    python -m spadnet_jax.convert official.pth OUT_DIR        # -> Orbax checkpoint
    python -m spadnet_jax.convert official.npz OUT_DIR        # no torch needed
    python -m spadnet_jax.convert --to_official CKPT OUT.npz  # -> torch-named .npz

The model configuration (scale, blocks, features, switches) is inferred from the state
dict's key names and shapes and stored with the checkpoint.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from spadnet_jax import models
from spadnet_jax.storage import files
from spadnet_jax.models import SPADNet
from spadnet_jax.untrusted import arrays

_RCAB = {"conv1": "body.0", "conv2": "body.2", "attention/reduce": "body.3.conv_du.0",
         "attention/expand": "body.3.conv_du.2"}
_HAB = {"conv_sr": "conv1_SR", "conv_guide": "conv1_heatmap", "gsac": "conv2_heatmap",
        "lsac": "pacconv1", "fuse": "conv3", "out": "conv2"}
_LEAF = {"kernel": "weight", "bias": "bias"}
# The PAC kernels the official PacConv2d knows, and the names of their learnable scalars there.
OFFICIAL_PAC_KERNELS = {"gaussian": {}, "inverse": {"inv_alpha": "inv_alpha", "inv_lambda": "inv_lambda"}}
_OFFICIAL_SCALARS = {k: v for names in OFFICIAL_PAC_KERNELS.values() for k, v in names.items()}


def _leaf_name(path: tuple[str, ...]) -> str:
  """Official name of a parameter leaf: weight/bias, or a PAC kernel's scalar that the
  official code has; any other kernel scalar is refused by name."""
  leaf = path[-1]
  if leaf in _LEAF:
    return _LEAF[leaf]
  if path[-2:-1] == ("lsac",) and leaf in _OFFICIAL_SCALARS:
    return _OFFICIAL_SCALARS[leaf]
  raise ValueError(f"parameter {'/'.join(path)} has no counterpart in the official model (its PAC "
                   f"kernels are {sorted(OFFICIAL_PAC_KERNELS)} with scalars {sorted(_OFFICIAL_SCALARS)})")


def _branch_offset(num_stages: int) -> int:
  """Official stage numbering: x4 (model/unet4.py) names its two stages 2 and 3."""
  return 1 if num_stages == 2 else 0


def official_key(path: tuple[str, ...], num_stages: int) -> str:
  """Official state_dict key of the Flax parameter at `path` (e.g. ('head', 'kernel'))."""
  mod = "/".join(path[:-1])
  suffix = _leaf_name(path)
  if mod == "head":
    return f"head.1.{suffix}"
  if mod in ("sr_out", "hm_out"):
    return f"{'SR' if mod == 'sr_out' else 'Heatmap'}_out.{suffix}"
  m = re.fullmatch(r"stage(\d+)_(sr|hm|hab)(_up|\d+)/(.+)", mod)
  if not m:
    raise KeyError(f"no official name for parameter {'/'.join(path)}")
  stage, branch, which, sub = m.groups()
  k = int(stage) + _branch_offset(num_stages)
  if which == "_up":
    return f"{'SR' if branch == 'sr' else 'Heatmap'}_up{k}.0.0.{suffix}"
  if branch == "hab":
    return f"hab_branch{k}.{which}.{_HAB[sub]}.{suffix}"
  return f"{'SR' if branch == 'sr' else 'Heatmap'}_branch{k}.{which}.{_RCAB[sub]}.{suffix}"


def torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The official (torch) shape of a parameter of Flax shape `flax_shape`."""
  if len(flax_shape) == 4:                       # HWIO conv -> OIHW
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  if len(flax_shape) == 2:                       # Dense (I, O) -> 1x1 conv (O, I, 1, 1)
    return (flax_shape[1], flax_shape[0], 1, 1)
  return tuple(flax_shape)


def torch_to_flax(name: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  """Official tensor layout -> Flax layout (OIHW conv -> HWIO; 1x1 conv -> Dense). A shape
  that does not fit is reported in the official layout."""
  value = np.asarray(value, np.float32)
  if value.shape != torch_shape(flax_shape):
    raise ValueError(f"{name} has shape {tuple(value.shape)}, the model needs "
                     f"{torch_shape(flax_shape)}")
  if len(flax_shape) == 4:
    return value.transpose(2, 3, 1, 0)
  if len(flax_shape) == 2:
    return value[:, :, 0, 0].T
  return value


def flax_to_torch(value: Any) -> np.ndarray:
  """Flax layout -> official tensor layout (the inverse of torch_to_flax)."""
  value = np.asarray(value, np.float32)
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T[:, :, None, None]
  return value


WRAPPERS = ("state_dict", "model", "params", "net", "network")   # keys a state dict is found under
PREFIXES = ("state_dict/", "module.", "model.")                   # key prefixes that are stripped


def unwrap_state_dict(obj: Any, where: str) -> dict[str, np.ndarray]:
  """The SPADNet state dict inside what official and derived checkpoints hold: a bare
  state dict, one under 'state_dict', 'model', ... (nested too), keys prefixed 'module.'
  (DataParallel), 'model.' or 'state_dict/' (a flattened .npz, whose other arrays are
  ignored). Anything else is refused, naming the top-level keys found."""
  for _ in range(4):
    if not isinstance(obj, Mapping):
      break
    inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
    if inner is None or any(str(k).endswith("head.1.weight") for k in obj):
      break
    obj = inner
  if not isinstance(obj, Mapping):
    raise ValueError(f"{where} does not hold a state dict (found {type(obj).__name__})")
  if any(str(k).startswith("state_dict/") for k in obj):     # a flattened .npz with extras
    obj = {k: v for k, v in obj.items() if str(k).startswith("state_dict/")}
  sd = {}
  for key, value in obj.items():
    if not hasattr(value, "shape"):
      continue
    key = str(key)
    for prefix in PREFIXES:
      while key.startswith(prefix):
        key = key[len(prefix):]
    sd[key] = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
  if "head.1.weight" not in sd:
    found = sorted(str(k) for k in obj)
    raise ValueError(f"{where} holds no SPADNet state dict (no 'head.1.weight'); top-level keys: "
                     f"{found[:12]}{'...' if len(found) > 12 else ''}")
  return sd


def load_state_dict(source: str | Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Read an official state dict from a mapping, a .pth (needs torch) or an .npz, in any
  of the wrappers unwrap_state_dict accepts."""
  if isinstance(source, Mapping):
    return unwrap_state_dict(source, "the state dict given")
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"state dict {path} does not exist")
  if path.endswith(".npz"):
    return unwrap_state_dict(arrays.load_npz(path), path)
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it "
                      "to an .npz of its state_dict first") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many types here
    raise ValueError(f"{path} cannot be read as a PyTorch checkpoint of tensors "
                     f"({type(e).__name__}); give an official .pth/.pt or an .npz") from e
  return unwrap_state_dict(obj, path)


def _block_count(sd: Mapping[str, np.ndarray], branch: str) -> int:
  """How many blocks the keys `<branch><stage>.<i>.` number, when they are numbered 0..n-1
  (a gap, such as one stray key for block 99999, is an error naming it: the count is
  never taken from the largest index alone)."""
  found = sorted({int(m.group(1)) for k in sd if (m := re.match(rf"{branch}\d+\.(\d+)\.", k))})
  if found and found[-1] != len(found) - 1:
    gap = next(i for i, n in enumerate(found) if n != i)
    key = next(k for k in sorted(sd) if re.match(rf"{branch}\d+\.{found[gap]}\.", k))
    raise ValueError(f"official state dict has {key} but no {branch} block {gap}: blocks "
                     "must be numbered 0 to n-1")
  return len(found)


def infer_model_fields(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Model fields implied by an official state dict's key names and shapes."""
  if "head.1.weight" not in sd:
    raise ValueError("official state dict has no 'head.1.weight': is this a SPADNet state dict?")
  head = sd["head.1.weight"]
  if head.ndim != 4 or head.shape[1] % 3:
    raise ValueError(f"official key head.1.weight has shape {head.shape}; expected "
                     "(n_feats, 3*scale**2, 3, 3)")
  scale = int(round((head.shape[1] // 3) ** 0.5))
  if 3 * scale * scale != head.shape[1]:
    raise ValueError(f"official key head.1.weight has {head.shape[1]} input channels, "
                     "not 3*scale**2")
  reduce_keys = sorted(k for k in sd if k.endswith("body.3.conv_du.0.weight"))
  reduced = sd[reduce_keys[0]].shape[0] if reduce_keys else None
  return dict(
      scale=scale,
      n_feats=int(head.shape[0]),
      number=_block_count(sd, "SR_branch"),
      hab_num=_block_count(sd, "hab_branch"),
      reduction=int(head.shape[0]) // reduced if reduced else 16,
      pac_kernel="inverse" if any(k.endswith("pacconv1.inv_alpha") for k in sd) else "gaussian",
      use_lsac=any(".pacconv1." in k for k in sd) or not habs,
      use_gsac=any(".conv2_heatmap." in k for k in sd) or not habs,
      heatmap_branch="Heatmap_out.weight" in sd,
  )


def from_official(state_dict_or_path: str | Mapping[str, Any], strict: bool = True,
                  **model_fields: Any) -> tuple[SPADNet, dict[str, Any]]:
  """Build the SPADNet an official state dict describes and its Flax variables.

  `model_fields` may fix fields the keys cannot tell (gsac_gate, pac_impl, dtype, ...);
  a field that contradicts the state dict is an error. Missing or mis-shaped keys are
  errors naming the key; unexpected keys are errors too unless strict=False, which
  reports them as a warning.
  """
  sd = load_state_dict(state_dict_or_path)
  nonfinite = sorted(k for k, v in sd.items()
                     if np.asarray(v).dtype.kind in "fc" and not np.isfinite(v).all())
  if nonfinite:
    raise ValueError(f"official state dict holds non-finite values (NaN or inf) in "
                     f"{nonfinite[0]}{f' and {len(nonfinite) - 1} more keys' if len(nonfinite) > 1 else ''}"
                     ": refusing to convert damaged weights")
  inferred = infer_model_fields(sd)
  for name, value in model_fields.items():
    if name in inferred and value != inferred[name]:
      raise ValueError(f"{name}={value!r} was requested but the state dict is for "
                       f"{name}={inferred[name]!r}")
  model = models.from_config({**inferred, **model_fields})
  abstract = jax.eval_shape(model.init, jax.random.key(0), model.example_input())
  flat = traverse_util.flatten_dict(abstract["params"])
  keys = {path: official_key(path, model.num_stages) for path in flat}
  params, missing, misshaped = {}, [], []
  for path, leaf in flat.items():
    key = keys[path]
    if key not in sd:
      missing.append(key)
      continue
    try:
      params[path] = torch_to_flax(key, sd[key], leaf.shape)
    except ValueError as e:
      misshaped.append(str(e))
  unexpected = sorted(set(sd) - set(keys.values()))
  problems = []
  if missing:
    problems.append(f"{len(missing)} missing keys: {missing}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped keys: {misshaped}")
  if unexpected and strict:
    problems.append(f"{len(unexpected)} keys this model does not use: {unexpected} "
                    "(pass strict=False / --no_strict to convert anyway)")
  if problems:
    raise ValueError(f"official state dict does not fit a SPADNet of {models.to_config(model)}: "
                     + "; ".join(problems))
  if unexpected:
    print(f"warning: official state dict has {len(unexpected)} keys this model does not use: "
          f"{unexpected}", file=sys.stderr)
  return model, {"params": traverse_util.unflatten_dict(params)}


def to_official(model: SPADNet, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax variables -> official state dict (torch names and layouts) as NumPy arrays.

  A model the official code cannot express (a PAC kernel it does not have) is refused.
  """
  if model.pac_kernel not in OFFICIAL_PAC_KERNELS:
    raise ValueError(f"PAC kernel {model.pac_kernel!r} has no official counterpart; the official "
                     f"model knows {sorted(OFFICIAL_PAC_KERNELS)}")
  flat = traverse_util.flatten_dict(dict(variables["params"]))
  return {official_key(path, model.num_stages): flax_to_torch(v) for path, v in flat.items()}


def save_official_npz(path: str, model: SPADNet, variables: Mapping[str, Any]) -> None:
  """Write `to_official` output as an .npz, atomically, refusing to overwrite."""
  if os.path.exists(path):
    raise FileExistsError(f"{path} already exists; choose another output path")
  with files.atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      np.savez(f, **to_official(model, variables))


def _convert(args: Any) -> None:
  from spadnet_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
    raise FileExistsError(f"output {args.output} already exists; choose a new path "
                          "(nothing is overwritten)")
  if args.to_official:
    model, variables, step = checkpoint.load_model(args.source)
    save_official_npz(args.output, model, variables)
    print(f"wrote {args.output} from {args.source} (step {step})")
    return
  fields = {} if args.gsac_gate is None else {"gsac_gate": args.gsac_gate}
  model, variables = from_official(args.source, strict=not args.no_strict, **fields)
  where = checkpoint.save_inference_checkpoint(args.output, model, variables, step=0)
  print(f"wrote {where}: {models.to_config(model)}")


def main(argv: list[str]) -> int:
  """Command line: see the module docstring. A mistake is one `error:` line, exit 1."""
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog="python -m spadnet_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("source", help="official .pth/.npz state dict (bare, or under "
                      "'state_dict'/'model', 'module.' prefixes allowed), or with "
                      "--to_official a spadnet-jax checkpoint directory")
  parser.add_argument("output", help="checkpoint directory to create, or with --to_official "
                      "the .npz to write")
  parser.add_argument("--to_official", action="store_true",
                      help="convert a spadnet-jax checkpoint to a torch-named .npz")
  parser.add_argument("--gsac_gate", default=None, choices=("official", "channel"))
  parser.add_argument("--no_strict", action="store_true",
                      help="convert even when the state dict has keys the model does not use")
  parser.add_argument("--verbosity", type=int, default=0, help="1: tracebacks on errors")
  args = parser.parse_args(argv)
  from spadnet_jax import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_logging(args.verbosity >= 1)
  return cli.one_line_errors(lambda: _convert(args), args.verbosity >= 1, (ImportError,))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
