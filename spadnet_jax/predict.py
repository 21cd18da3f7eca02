"""Super-resolve face images with a checkpoint.

    python -m spadnet_jax.predict --checkpoint C --input DIR_OR_FILE --output DIR

LR images of the model's input size (128/scale, e.g. 16x16 at x8) are used as they are;
larger square images are first reduced to that size with Pillow's bicubic (and the output
says so); non-square images are rejected, never distorted. Each LR image is resized to
128x128 with the same kernel (the network input) and the SR result is written as PNG.
The inputs are split into equal batches of at most --batch_size (the last padded by
fewer images than there are batches), so the model compiles for one shape. The first run
for a checkpoint exports its SR function and keeps it with the weights and the compiled
program (serving/program_cache.py, compile_cache.py, under --cache_dir); later runs load
those and start in about the time imports take. Unreadable files are
reported by name, the rest still processed, and the exit status is then non-zero.

    python -m spadnet_jax.predict --checkpoint C --input PHOTOS --output DIR --faces [--upscale 4]

takes whole photos instead (the `faces` extra): every face is found (an upsampled detector
pass finds small ones), aligned by its landmarks to the model's frame, made into the model's
LR input as training made it, super-resolved and pasted back with a feathered edge into the
photo enlarged by --upscale (bicubic elsewhere). Written per photo: NAME.png, the
NAME_compare.png side by side with plain bicubic, and NAME_faces/ with each face's LR and SR.
Faces too small (under half the LR size), too large (over twice it: the LR input would
discard more than the model restores) or not confirmed as faces are reported and left bicubic.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from spadnet_jax import compile_cache, process_setup, visualize
from spadnet_jax.data import contract, degrade
from spadnet_jax.faces import photo_sets
from spadnet_jax.serving import program_cache
from spadnet_jax.untrusted import images

MAX_OUTPUT_PIXELS = 100e6   # --faces: an enlarged photo (held as float32 while faces go in)
# --max_pixels' defaults: an aligned face image is reduced to the LR size in float32, so 16
# megapixels (4096x4096) already take 0.2 GB; a whole photo for --faces may be larger.
MAX_FACE_PIXELS = 16e6
MAX_PHOTO_PIXELS = images.MAX_PIXELS


def list_inputs(path: str) -> list[str]:
  """The image files named by `path` (a file or a folder); FileNotFoundError when none."""
  if os.path.isdir(path):
    found = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(photo_sets.IMAGE_EXTENSIONS))
    if not found:
      raise FileNotFoundError(f"input folder {path} holds no images ({', '.join(photo_sets.IMAGE_EXTENSIONS)})")
    return found
  if os.path.isfile(path):
    return [path]
  raise FileNotFoundError(f"input {path} does not exist")


def output_names(paths: list[str]) -> dict[str, str]:
  """A distinct PNG name per input: its stem, or its whole name where stems collide
  (face.jpg and face.png become face.jpg.png and face.png.png)."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  counts = {s: stems.count(s) for s in stems}
  names = {p: (s if counts[s] == 1 else os.path.basename(p)) + ".png" for p, s in zip(paths, stems)}
  if len(set(names.values())) != len(paths):          # same name in different folders
    names = {p: f"{i:05d}_{n}" for i, (p, n) in enumerate(names.items())}
  return names


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output(inputs: str, files: list[str], output: str, written: list[str]) -> None:
  """Refuse an --output that is (or lies inside) the --input folder, or where a file to be
  written (`written`, names relative to the output) is one of the input files: nothing
  the user gave is ever written over."""
  if os.path.isdir(inputs) and _inside(output, inputs):
    raise ValueError(f"--output {output} is inside --input {inputs}: the results would mix "
                     "with (and could replace) the input images; choose a folder outside it")
  sources = {os.path.realpath(f) for f in files}
  clash = next((n for n in written if os.path.realpath(os.path.join(output, n)) in sources), None)
  if clash:
    raise ValueError(f"--output {output}: writing {clash} would replace the input image "
                     f"{os.path.join(output, clash)}; choose another --output")


def prepare_output(path: str) -> None:
  """Create the output folder, or fail naming it, before any model is loaded."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"--output {path} is a file; give a folder for the SR images")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise OSError(f"--output {path} cannot be created ({e.strerror})") from e
  if not os.access(path, os.W_OK):
    raise PermissionError(f"--output {path} is not writable")


def load_lr(path: str, lr_size: int, lr_kernel: str = "pil",
            max_pixels: float = MAX_FACE_PIXELS) -> tuple[np.ndarray, str | None]:
  """(lr_size, lr_size, 3) float image and a note when it had to be reduced.

  Raises ValueError naming the file for unreadable or non-square images, and for images
  whose header declares more than `max_pixels` (a larger JPEG is decoded reduced instead).
  """
  img, _, decoded = images.load_rgb(path, max_pixels, "--max_pixels", min_side=lr_size)
  w, h = img.size
  if w != h:
    raise ValueError(f"{path}: image is {w}x{h}; only square faces are accepted (crop it first)")
  notes = [decoded] if decoded else []
  if w < lr_size:
    raise ValueError(f"{path}: image is {w}x{h}, smaller than the model's {lr_size}x{lr_size} input")
  arr = np.asarray(img, np.float32) / 255.0
  if w > lr_size:
    arr = np.clip(degrade.resize(arr, lr_size, lr_kernel), 0, 1)
    notes.append(f"reduced from {w}x{h} to {lr_size}x{lr_size} (bicubic) before super-resolution")
  return arr, "; ".join(notes) or None


def default_batch_size() -> int:
  """Images per model call when --batch_size is not given: 1 on a CPU, where larger batches
  ran no faster per image but raised the peak memory (docs/performance.md), 8 on an
  accelerator."""
  return 1 if jax.default_backend() == "cpu" else 8


def batch_plan(count: int, batch_size: int) -> int:
  """The one batch size `count` inputs run at: as few batches as batch_size allows, all of
  the same size, so that one compiled shape serves them and the last is padded by fewer
  images than there are batches (10 inputs at --batch_size 8: two batches of 5)."""
  batches = -(-count // batch_size)
  return -(-count // batches)


def run_padded(apply: Callable[[Any, np.ndarray], Any], variables: Any, x: np.ndarray,
               batch_size: int) -> np.ndarray:
  """apply(variables, x) for up to batch_size inputs, padded to exactly batch_size (copies
  of the last) so that every call has the one compiled shape; the padding's outputs dropped."""
  x = np.asarray(x, np.float32)         # the compiled program's input type
  pad = batch_size - len(x)
  padded = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
  return np.asarray(apply(variables, padded))[:len(x)]


def compile_program(program: program_cache.Program, batch_size: int) -> Callable[[Any, np.ndarray], Any]:
  """The program for batches of `batch_size`, compiled now; one line says so when it was
  compiled rather than loaded from the persistent compilation cache (compile_cache), and
  where it was kept for the next run. The heap that lowering and loading freed is handed
  back to the OS before the model runs: a repeated 10-face call peaked at 0.44-0.48 GiB
  with it, 0.50-0.54 without (docs/performance.md)."""
  start = time.perf_counter()
  spec = jax.ShapeDtypeStruct((batch_size, contract.HR_SIZE, contract.HR_SIZE, 3), np.float32)
  with compile_cache.watch() as seen:
    compiled = jax.jit(program.call).lower(program.variables, spec).compile()
  process_setup.release_host_memory()
  if not seen.hits:
    kept = f"; kept in {compile_cache.cache_root(os.environ)} for later runs" if seen.misses else ""
    print(f"compiled the model for batches of {batch_size} in "
          f"{time.perf_counter() - start:.1f} s{kept}")
  return compiled


def load_program(path: str) -> program_cache.Program:
  """An export folder's model.jaxexport, or a checkpoint through the program cache."""
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  if artifacts.is_export_folder(path):
    return artifacts.load_program(path)
  return program_cache.load(path)


def _kind(path: str) -> str:
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  return "model" if artifacts.is_export_folder(path) else "checkpoint"


def predict(checkpoint_path: str, inputs: str, output: str, batch_size: int | None = None,
            lr_kernel: str = "pil", max_pixels: float = MAX_FACE_PIXELS) -> int:
  """Super-resolve every image under `inputs`; returns the number of failed files
  (unreadable, not square, or declaring more than `max_pixels`).

  Args:
    checkpoint_path: a checkpoint folder (the newest intact step), one step, or an export
      folder (spadnet_jax.export).
    inputs: an LR face image or a folder of them.
    output: the folder for the SR PNGs (neither the input folder nor inside it).
    batch_size: images per model call at most (None: default_batch_size()).
    lr_kernel: the LR synthesis the model was trained with (config.data.lr_kernel).
    max_pixels: images whose header declares more are refused before decoding (a larger
      JPEG is decoded reduced instead).
  """
  files, failures = list_inputs(inputs), 0
  names = output_names(files)
  check_output(inputs, files, output, list(names.values()))
  prepare_output(output)
  program = load_program(checkpoint_path)
  scale = program.model_config["scale"]
  lr_size = contract.lr_size(scale)
  print(f"{_kind(checkpoint_path)} {checkpoint_path} (step {program.step}): x{scale}, "
        f"input {lr_size}x{lr_size}")
  batch_size = batch_plan(len(files), batch_size or default_batch_size())
  apply, variables = compile_program(program, batch_size), jax.device_put(program.variables)
  pending: list[tuple[str, np.ndarray]] = []

  def flush() -> None:
    if not pending:
      return
    x = np.stack([degrade.resize(lr, contract.HR_SIZE, lr_kernel) for _, lr in pending])
    sr = run_padded(apply, variables, np.clip(x, 0, 1), batch_size)
    for (path, _), img in zip(pending, sr):
      out = os.path.join(output, names[path])
      visualize.save_png(out, img)
      print(f"{path} -> {out}")
    pending.clear()

  for path in files:
    try:
      lr, note = load_lr(path, lr_size, lr_kernel, max_pixels)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      failures += 1
      continue
    if note:
      print(f"{path}: {note}")
    pending.append((path, lr))
    if len(pending) == batch_size:
      flush()
  flush()
  if failures:
    print(f"{failures} of {len(files)} files failed", file=sys.stderr)
  return failures


@dataclasses.dataclass(frozen=True)
class FaceOptions:
  """predict --faces: the command line's flags of the same names."""
  batch_size: int | None = None    # faces per model call, across photos (None: default_batch_size())
  lr_kernel: str = "pil"           # the LR synthesis the model was trained with
  upscale: float | None = None     # how much each photo is enlarged (None: the model's scale)
  detector: str = "hog"            # dlib's HOG or CNN face detector
  min_face: float | None = None    # smallest face restored, photo px (None: half the LR size)
  max_face: float | None = None    # largest face restored, photo px (None: twice the LR size)
  max_upsample: int = 3            # doublings of the photo for the small-face pass
  max_pixels: float = MAX_PHOTO_PIXELS   # photos declaring more are refused undecoded


def predict_faces(checkpoint_path: str, inputs: str, output: str,
                  options: FaceOptions = FaceOptions()) -> int:
  """Restore the faces of every photo under `inputs` (a file or a folder) into `output`
  (NAME.png, NAME_compare.png and NAME_faces/ per photo); returns the number of photos that
  failed (unreadable, over max_pixels, or too large to enlarge)."""
  from spadnet_jax.faces import dlib_models, restore  # pylint: disable=import-outside-toplevel
  batch_size, lr_kernel, upscale = options.batch_size, options.lr_kernel, options.upscale
  batch_size = batch_size or default_batch_size()
  min_face, max_face, max_pixels = options.min_face, options.max_face, options.max_pixels
  if upscale is not None and not 1 <= upscale <= 16:
    raise ValueError(f"--upscale {upscale:g}: must be between 1 and 16")
  files, failures = list_inputs(inputs), 0
  names = output_names(files)
  stems = [n[:-len(".png")] for n in names.values()]
  check_output(inputs, files, output, [f"{s}{end}" for s in stems for end in (".png", "_compare.png")])
  models = dlib_models.load(options.detector)  # a missing extra is said before anything is made
  prepare_output(output)
  program = load_program(checkpoint_path)
  scale = program.model_config["scale"]
  upscale = float(scale if upscale is None else upscale)
  lr_size = contract.lr_size(scale)
  min_face = lr_size / 2 if min_face is None else min_face
  max_face = 2 * lr_size if max_face is None else max_face

  queue: list = []       # faces waiting for the model, across photos
  waiting: list = []     # (path, photo, faces) not yet written, in input order

  def run(full_only: bool) -> None:
    while len(queue) >= batch_size or (queue and not full_only):
      chunk, queue[:] = queue[:batch_size], queue[batch_size:]
      for f, sr in zip(chunk, run_padded(apply, variables, np.stack([f.lr_up for f in chunk]),
                                         batch_size)):
        f.sr = sr

  def write_ready() -> None:
    while waiting and all(f.sr is not None for f in waiting[0][2] if f.lr_up is not None):
      path, photo, faces = waiting.pop(0)
      bicubic, restored = restore.restore(photo, faces, upscale)
      base = os.path.join(output, names[path][:-len(".png")])
      for face in faces:
        if face.sr is not None:
          visualize.save_png(f"{base}_faces/face{face.index}_lr.png", face.lr)
          visualize.save_png(f"{base}_faces/face{face.index}_sr.png", face.sr)
      visualize.save_png(f"{base}_compare.png", restore.side_by_side(bicubic, restored))
      visualize.save_png(f"{base}.png", restored)
      print(f"{path}: {_faces_line(faces)} -> {base}.png ({restored.shape[1]}x{restored.shape[0]})")

  print(f"checkpoint {checkpoint_path} (step {program.step}): x{scale}; photos enlarged "
        f"x{upscale:g}, faces of {min_face:g}-{max_face:g} px restored")
  apply, variables = compile_program(program, batch_size), jax.device_put(program.variables)
  for path in files:
    try:
      width, height = images.header_size(path)     # nothing decoded yet
      if width * height * upscale ** 2 > MAX_OUTPUT_PIXELS:
        raise ValueError(f"{path}: {width}x{height} enlarged x{upscale:g} exceeds "
                         f"{MAX_OUTPUT_PIXELS / 1e6:.0f} megapixels; lower --upscale")
      photo = np.asarray(photo_sets.load_photo(path, max_pixels))
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      failures += 1
      continue
    faces = restore.plan(models, photo, scale=scale, lr_kernel=lr_kernel,
                         min_face=min_face, max_face=max_face, max_upsample=options.max_upsample)
    waiting.append((path, photo, faces))
    queue.extend(f for f in faces if f.lr_up is not None)
    run(full_only=len(waiting) <= batch_size)     # a part batch rather than photos piling up
    write_ready()
  run(full_only=False)
  write_ready()
  if failures:
    print(f"{failures} of {len(files)} photos failed", file=sys.stderr)
  return failures


def _faces_line(faces: list[Any]) -> str:
  """'2 faces: 1 restored; face 2 left bicubic (too small: ...)' and the like."""
  if not faces:
    return "no face found; bicubic only"
  done = sum(f.sr is not None for f in faces)
  text = f"{len(faces)} face{'s' * (len(faces) > 1)}: {done} restored"
  return "; ".join([text] + [f"face {f.index} left bicubic ({f.problem})"
                             for f in faces if f.problem])


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m spadnet_jax.predict", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="a checkpoint folder (its newest intact step), one "
                      "step, or a gs:// URL")
  source.add_argument("--model", help="an export folder (python -m spadnet_jax.export): runs its "
                      "model.jaxexport, no Flax model built")
  p.add_argument("--input", required=True, help="an image file or a folder of images")
  p.add_argument("--output", required=True, help="folder for the SR PNGs")
  p.add_argument("--batch_size", type=int, default=FaceOptions.batch_size,
                 help="images per model call at most (default: 1 on a CPU, 8 on an accelerator)")
  p.add_argument("--lr_kernel", default=FaceOptions.lr_kernel, choices=sorted(degrade.KERNELS),
                 help="the LR synthesis the model was trained with (config.data.lr_kernel)")
  p.add_argument("--faces", action="store_true",
                 help="whole photos: find, align, restore and paste back every face")
  p.add_argument("--upscale", type=float, default=None,
                 help="--faces: how much the photo is enlarged (default: the model's scale)")
  p.add_argument("--detector", default=FaceOptions.detector, choices=("hog", "cnn"),
                 help="--faces: dlib's HOG detector (fast) or its CNN one (slow, more poses)")
  p.add_argument("--min_face", type=float, default=None,
                 help="--faces: smallest face restored, in photo px (default: half the LR size)")
  p.add_argument("--max_face", type=float, default=None,
                 help="--faces: largest face restored, in photo px (default: twice the LR size; "
                      "a larger face loses more to the LR input than the model restores)")
  p.add_argument("--max_upsample", type=int, default=FaceOptions.max_upsample,
                 help="--faces: doublings of the photo for the small-face detector pass")
  p.add_argument("--max_pixels", type=float, default=None,
                 help="images whose header declares more pixels are refused before decoding "
                      f"(default: {MAX_FACE_PIXELS / 1e6:.0f} million for face images, a larger "
                      f"JPEG decoded reduced instead; {MAX_PHOTO_PIXELS / 1e6:.0f} million "
                      "with --faces)")
  p.add_argument("--cache_dir", default=None,
                 help="where compiled programs are kept between runs (default: $SPADNET_CACHE_DIR, "
                      "else ~/.cache/spadnet_jax)")
  p.add_argument("--verbosity", type=int, default=0, help="1: tracebacks and library logs")
  a = p.parse_args(argv)
  if a.cache_dir is not None:
    compile_cache.configure(root=os.path.abspath(a.cache_dir))
  from spadnet_jax import cli  # pylint: disable=import-outside-toplevel
  from spadnet_jax.faces import dlib_models  # pylint: disable=import-outside-toplevel
  from spadnet_jax.serving import artifacts  # pylint: disable=import-outside-toplevel
  from spadnet_jax.storage import paths  # pylint: disable=import-outside-toplevel
  cli.quiet_logging(a.verbosity >= 1, data_sets=False)

  def run() -> int:
    if a.max_pixels is not None and a.max_pixels < 1:
      raise ValueError(f"--max_pixels {a.max_pixels:g}: must be at least 1")
    if a.batch_size is not None and a.batch_size < 1:
      raise ValueError(f"--batch_size {a.batch_size}: must be at least 1")
    if a.checkpoint:
      paths.resolve(a.checkpoint, "--checkpoint")     # a URL this installation cannot reach
    elif not artifacts.is_export_folder(a.model):
      raise FileNotFoundError(f"--model {a.model} is not an export folder (no "
                              f"{artifacts.MANIFEST} and {artifacts.JAXEXPORT})")
    source = a.checkpoint or a.model
    if a.faces:
      options = FaceOptions(a.batch_size, a.lr_kernel, a.upscale, a.detector, a.min_face,
                            a.max_face, a.max_upsample, a.max_pixels or MAX_PHOTO_PIXELS)
      return 1 if predict_faces(source, a.input, a.output, options) else 0
    return 1 if predict(source, a.input, a.output, a.batch_size, a.lr_kernel,
                        a.max_pixels or MAX_FACE_PIXELS) else 0

  return cli.one_line_errors(run, a.verbosity >= 1, (dlib_models.MissingExtra,))


if __name__ == "__main__":
  from spadnet_jax import process_setup
  process_setup.prepare(long_running=False)   # the program itself only, never a caller of main
  sys.exit(main(sys.argv[1:]))
