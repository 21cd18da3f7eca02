"""Prepare a folder of face photos for training: the face_folder layout train.py reads.

    python -m spadnet_jax.prepare --input DIR --output MANUAL_DIR [--split train=0.9,test=0.1]

Each photo's face is found by dlib (HOG, or --detector cnn), given 68 landmarks, cropped by
DIC's rule (a square on the face, 30% larger, cut to the photo) and resized to 128x128 with
Pillow's bicubic. CelebA (with list_bbox_celeba.txt) and Helen are recognised and split as
the literature did; any other folder is split by --split and --seed. Photos with no face,
several faces or a face the crop cannot hold are skipped and listed with the reason in
MANUAL_DIR/prepare_report.tsv. The work runs over --workers processes and is kept per photo
under MANUAL_DIR/.prepare, so a rerun resumes; the result does not depend on the workers.
The last line printed is the train.py command for the result.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
import json
import multiprocessing
import os
import pickle
import re
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

import numpy as np
from PIL import Image

from spadnet_jax.storage import files
from spadnet_jax.faces import detect, dlib_models, frame, photo_sets
from spadnet_jax.untrusted import images

HR_SIZE = 128   # data.contract.HR_SIZE; not imported, so that workers start without JAX
WORK = ".prepare"
REPORT = "prepare_report.tsv"
WRITTEN = "written.json"   # in WORK: every file prepare wrote outside WORK, relative to the output
VERSION = 1   # of the per-photo records; a change invalidates earlier ones


def output_name(name: str) -> str:
  """The PNG a photo becomes: its relative path, folders joined by '__'."""
  return os.path.splitext(name)[0].replace(os.sep, "__") + ".png"


def crop_face(models: dlib_models.FaceModels, photo: Image.Image, settings: dict[str, Any],
              annotated: frame.Box | None) -> tuple[np.ndarray, np.ndarray]:
  """The 128x128 face of a photo and its landmarks; ValueError with the reason to skip it."""
  image = np.asarray(photo)
  faces = [f for f in detect.find_faces(models, image, settings["max_upsample"]) if f.confirmed]
  if annotated is not None:     # CelebA: the detection the annotated box is about
    x0, y0, x1, y1 = annotated
    inside = [f for f in faces if x0 <= (f.box[0] + f.box[2]) / 2 <= x1
              and y0 <= (f.box[1] + f.box[3]) / 2 <= y1]
    if not inside:
      raise ValueError("no detected face in the annotated box")
    face = max(inside, key=lambda f: detect.iou(f.box, annotated))
    box = frame.square_box(annotated, "short", settings["expand"])
  else:
    if not faces:
      raise ValueError("no face found")
    if len(faces) > 1:
      raise ValueError(f"{len(faces)} faces found (one face per photo)")
    face = faces[0]
    box = frame.square_box(frame.landmark_box(face.landmarks), "long", settings["expand"])
  problem = detect.implausible(face.landmarks)
  if problem:
    raise ValueError(problem)
  side = box[2] - box[0]
  if side < settings["min_face"]:
    raise ValueError(f"face too small: its crop is {side:.0f} px, under --min_face "
                     f"{settings['min_face']}")
  box = frame.clip_box(box, photo.width, photo.height)
  points = frame.box_points(face.landmarks, box, HR_SIZE)
  outside = np.flatnonzero((points < -0.5).any(1) | (points > HR_SIZE - 0.5).any(1))
  if outside.size:
    raise ValueError(f"landmark {int(outside[0])} lies outside the crop")
  return frame.crop(photo, box, HR_SIZE), points


def _stat(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns]


def prepare_one(models: dlib_models.FaceModels, root: str, name: str, staging: str,
                settings: dict[str, Any], annotated: frame.Box | None) -> dict[str, Any]:
  """One photo: its face written to `staging` (atomically) and the record saying so.

  Args:
    models: dlib's detectors and landmark model.
    root: the input folder; `name` is the photo's path relative to it.
    staging: where the 128x128 face is written.
    settings: the run's settings (settings.json).
    annotated: CelebA's box for the photo, or None.
  """
  path = os.path.join(root, name)
  record = {"name": name, "out": output_name(name), "stat": _stat(path), "version": VERSION}
  try:
    photo = photo_sets.load_photo(path, settings["max_pixels"])
    face, points = crop_face(models, photo, settings, annotated)
  except ValueError as e:      # the report names the photo: its reason need not
    return {**record, "status": "skipped", "reason": str(e).removeprefix(f"{path}: ")}
  out = os.path.join(staging, record["out"])
  with files.atomic_path(out) as tmp:
    Image.fromarray(face).save(tmp, format="PNG")
  return {**record, "status": "ok", "landmarks": points.round(4).tolist()}


_WORKER: dict[str, Any] = {}   # per worker process: its models and job constants


def _start_worker(detector: str, root: str, staging: str, settings: dict[str, Any]) -> None:
  _WORKER.update(models=dlib_models.load(detector), root=root, staging=staging, settings=settings)


def _work(item: tuple[str, frame.Box | None]) -> dict[str, Any]:
  w = _WORKER
  return prepare_one(w["models"], w["root"], item[0], w["staging"], w["settings"], item[1])


class Progress:
  """done/total, the rate and the time left: one updating line on a terminal, a line per
  tenth of the work otherwise."""

  def __init__(self, total: int, stream: TextIO = sys.stderr):
    self.total, self.done, self.stream = total, 0, stream
    self.start = time.monotonic()
    self.tty = stream.isatty()
    self.last = 0.0
    self.next_tenth = 1

  def step(self, skipped: int) -> None:
    self.done += 1
    now = time.monotonic()
    final = self.done == self.total
    tenth = self.done * 10 >= self.next_tenth * self.total
    if not (final or (self.tty and now - self.last > 0.5) or (not self.tty and tenth)):
      return
    self.last = now
    while self.done * 10 >= self.next_tenth * self.total and self.next_tenth <= 10:
      self.next_tenth += 1
    rate = self.done / max(now - self.start, 1e-9) * 60
    left = (self.total - self.done) / max(rate, 1e-9) * 60
    line = (f"{self.done:,}/{self.total:,} photos ({skipped:,} skipped), {rate:,.0f}/min, "
            f"{_duration(left)} left")
    self.stream.write(("\r" + line + ("\n" if final else "")) if self.tty else line + "\n")
    self.stream.flush()


def _duration(seconds: float) -> str:
  s = int(round(seconds))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _valid_record(r: Any) -> bool:
  """Whether a record line is one prepare_one wrote: its output name is the one its photo's
  name gives (a path read from a file is never followed as it stands) and an ok record
  carries 68 finite landmarks."""
  if not (isinstance(r, dict) and r.get("version") == VERSION and isinstance(r.get("name"), str)
          and r.get("out") == output_name(r["name"]) and isinstance(r.get("stat"), list)):
    return False
  if r.get("status") == "skipped":
    return isinstance(r.get("reason"), str)
  try:
    points = np.asarray(r.get("landmarks"), np.float64)
  except (TypeError, ValueError):
    return False
  return r.get("status") == "ok" and points.shape == (68, 2) and bool(np.isfinite(points).all())


def read_records(path: str) -> dict[str, dict[str, Any]]:
  """The records written so far; a line cut short by an interruption, or not of the form
  prepare writes, is dropped (that photo is then prepared again)."""
  out = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        if _valid_record(r):
          out[r["name"]] = r
  return out


def _check_settings(work: str, settings: dict[str, Any]) -> None:
  path = os.path.join(work, "settings.json")
  if os.path.isfile(path):
    with open(path) as f:
      before = json.load(f)
    changed = [k for k in settings if before.get(k, settings[k]) != settings[k]]  # new keys pass
    if changed:
      k = changed[0]
      raise ValueError(f"{os.path.dirname(work)} was prepared with {k}={before.get(k)!r}, not "
                       f"{settings[k]!r}: rerun with the same settings or choose a new --output")
    return
  os.makedirs(work, exist_ok=True)
  with files.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(settings, f, indent=1)


def _run(todo: list[tuple[str, frame.Box | None]], workers: int, detector: str, root: str,
         staging: str, settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
  if workers <= 1 or len(todo) <= 1:
    models = dlib_models.load(detector)
    for name, box in todo:
      yield prepare_one(models, root, name, staging, settings, box)
    return
  # Spawned, so no dlib or numpy state is forked; an executor, so a worker that cannot
  # start is an error (BrokenProcessPool) rather than a pool restarting it forever.
  with futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _start_worker,
                                   (detector, root, staging, settings)) as pool:
    yield from pool.map(_work, todo, chunksize=max(1, min(16, len(todo) // (8 * workers))))


# --- what prepare owns in its output -------------------------------------------------------

_TEMPORARY = re.compile(r"\.tmp-\d+(\.[^./]*)?$")   # files.atomic_path's, left by a killed run


def _target(rel: str) -> str:
  """The file a temporary of files.atomic_path stands for (other names: themselves)."""
  return _TEMPORARY.sub(r"\1", rel)


def owned(output: str) -> set[str]:
  """The files (relative to `output`) that prepare wrote there: its WRITTEN record, or for a
  folder prepared before that record was kept, the faces its per-photo records name, each
  split's landmark.pkl and the report."""
  path = os.path.join(output, WORK, WRITTEN)
  if os.path.isfile(path):
    with open(path) as f:
      names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
      raise ValueError(f"{path} is damaged: expected a list of file names")
    outside = next((n for n in names if os.path.isabs(n) or os.path.normpath(n) != n
                    or n.split(os.sep)[0] in ("..", WORK)), None)
    if outside is not None:   # prepare removes what this record names: only inside output
      raise ValueError(f"{path} is damaged: it names {outside!r}, not a file prepare writes "
                       "inside the folder")
    return set(names)
  if not os.path.isfile(os.path.join(output, WORK, "settings.json")):
    return set()
  faces = {r["out"] for r in read_records(os.path.join(output, WORK, "records.jsonl")).values()
           if r.get("status") == "ok"}
  mine = {REPORT}
  for split in os.listdir(output):
    if os.path.isdir(os.path.join(output, split, "HR")):
      mine |= {f"{split}/landmark.pkl"} | {f"{split}/HR/{n}" for n in faces}
  return mine


def foreign_files(output: str, mine: set[str]) -> list[str]:
  """Files under `output` that are not in `mine` (prepare's own), its work folder aside."""
  if not os.path.isdir(output):
    return []
  found = []
  for folder, dirs, names in os.walk(output):
    rel_folder = os.path.relpath(folder, output)
    if rel_folder == ".":
      dirs[:] = [d for d in dirs if d != WORK]
    for name in names:
      rel = os.path.normpath(os.path.join(rel_folder, name))
      if _target(rel) not in mine:
        found.append(rel)
  return sorted(found)


def _record_owned(output: str, names: set[str]) -> None:
  with files.atomic_path(os.path.join(output, WORK, WRITTEN)) as tmp, open(tmp, "w") as f:
    json.dump(sorted(names), f, indent=0)


def assemble(output: str, records: Iterable[dict[str, Any]], splits: dict[str, str]) -> dict[str, int]:
  """Link the prepared faces into <split>/HR, write each split's landmark.pkl and the report;
  faces no longer in a split are removed from it. Only files an earlier run of prepare
  wrote are ever removed or replaced (WRITTEN names them; files of the same names that
  someone else wrote survive unless the caller checked --overwrite). Returns the count
  per split."""
  staging = os.path.join(output, WORK, "faces")
  by_split: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  rows = []
  for r in sorted(records, key=lambda r: r["name"]):
    if r["status"] == "ok":
      split = splits[r["name"]]
      rows.append(f"{r['name']}\tok\t{split}")
      if split != "unused":
        by_split[split][r["out"]] = np.asarray(r["landmarks"], np.float32)
    else:
      rows.append(f"{r['name']}\tskipped\t{r['reason']}")
  before = owned(output)
  names = set(by_split) | {"train", "test"} | {n.split("/")[0] for n in before if "/" in n}
  planned = {REPORT} | {f"{s}/landmark.pkl" for s in names} | {
      f"{s}/HR/{out}" for s in names for out in by_split.get(s, {})}
  _record_owned(output, before | planned)        # before writing: a killed run still owns them
  for split in sorted(names):
    hr = os.path.join(output, split, "HR")
    os.makedirs(hr, exist_ok=True)
    wanted = by_split.get(split, {})
    for out in wanted:
      src, dst = os.path.join(staging, out), os.path.join(hr, out)
      if os.path.exists(dst) and os.path.samefile(src, dst):
        continue
      with files.atomic_path(dst) as tmp:
        try:
          os.link(src, tmp)
        except OSError:
          import shutil  # pylint: disable=import-outside-toplevel
          shutil.copyfile(src, tmp)
    with files.atomic_path(os.path.join(output, split, "landmark.pkl")) as tmp, open(tmp, "wb") as f:
      pickle.dump(dict(sorted(wanted.items())), f)
  for stale in sorted(before - planned):             # faces this run no longer places
    path = os.path.join(output, stale)
    if os.path.isfile(path):
      os.remove(path)
  for folder, _, names_here in os.walk(output):      # what a killed run of ours left half-written
    for name in names_here:
      rel = os.path.relpath(os.path.join(folder, name), output)
      if rel != _target(rel) and _target(rel) in planned | before:
        os.remove(os.path.join(folder, name))
  with files.atomic_path(os.path.join(output, REPORT)) as tmp, open(tmp, "w") as f:
    f.write("photo\tstatus\tsplit or reason\n" + "".join(r + "\n" for r in rows))
  _record_owned(output, planned)
  return {s: len(by_split.get(s, {})) for s in sorted(names)}


@dataclasses.dataclass(frozen=True)
class Options:
  """How photos become faces and splits: the command line's --flags of the same names."""
  split: str = "train=0.9,test=0.1"   # fractions for a plain folder
  seed: int = 0                       # orders a plain folder before the split
  detector: str = "hog"               # dlib's HOG or CNN face detector
  min_face: int = 64                  # smallest crop in photo pixels
  expand: float = frame.EXPAND        # margin added to the face square
  max_upsample: int = 1               # doublings of the photo for the small-face pass
  max_pixels: float = images.MAX_PIXELS   # photos declaring more are skipped undecoded

  def check(self) -> None:
    """ValueError naming the first invalid option."""
    photo_sets.parse_fractions(self.split)
    if self.detector not in dlib_models.DETECTORS:
      raise ValueError(f"--detector {self.detector!r}: use one of {', '.join(dlib_models.DETECTORS)}")
    if self.min_face < 1:
      raise ValueError(f"--min_face {self.min_face}: must be at least 1 px")
    if not 0 <= self.expand <= 3:
      raise ValueError(f"--expand {self.expand}: must be between 0 and 3")
    if self.max_pixels < 1:
      raise ValueError(f"--max_pixels {self.max_pixels:g}: must be at least 1")


def prepare(input_dir: str, output: str, options: Options = Options(), *, workers: int = 1,
            overwrite: bool = False) -> dict[str, int]:
  """Prepare `input_dir` into `output` (resuming earlier work there); the count per split.

  Args:
    input_dir: the photos (CelebA, Helen or any folder, searched recursively).
    output: the face_folder manual_dir written.
    options: how photos become faces and splits.
    workers: processes detecting faces.
    overwrite: write into an `output` holding files prepare did not write (refused
      otherwise); even then only files of the names it writes are replaced, and only its
      own are removed.
  """
  options.check()
  fractions = photo_sets.parse_fractions(options.split)
  detector, seed = options.detector, options.seed
  dlib_models.model_path(dlib_models.LANDMARKS_FILE)    # the extra is there, before any work
  photos = photo_sets.recognise(input_dir, exclude=output)
  print(f"input: {photos.describe()}", flush=True)
  settings = {"kind": photos.kind, "detector": detector, "min_face": options.min_face,
              "expand": options.expand, "max_upsample": options.max_upsample,
              "max_pixels": options.max_pixels}
  work = os.path.join(output, WORK)
  if os.path.exists(output) and not os.path.isdir(output):
    raise NotADirectoryError(f"--output {output} is a file; give a folder")
  mine = owned(output)
  foreign = foreign_files(output, mine)
  if foreign and not overwrite:
    raise FileExistsError(
        f"--output {output} holds {len(foreign):,} files prepare did not make (e.g. "
        f"{foreign[0]}): choose a new or empty folder, or add --overwrite to write into it "
        "(files of the names prepare writes are then replaced; nothing else is removed)")
  _check_settings(work, settings)
  _record_owned(output, mine)    # from here on the record, never the legacy guess, says
  staging = os.path.join(work, "faces")
  os.makedirs(staging, exist_ok=True)
  log = os.path.join(work, "records.jsonl")
  records = read_records(log)
  done = {n for n in photos.images if n in records
          and records[n]["stat"] == _stat(os.path.join(photos.root, n))
          and (records[n]["status"] != "ok"
               or os.path.isfile(os.path.join(staging, records[n]["out"])))}
  todo = [(n, photos.boxes.get(n)) for n in photos.images if n not in done]
  if done:
    print(f"resuming: {len(done):,} photos already done, {len(todo):,} to go", flush=True)
  skipped = sum(records[n]["status"] != "ok" for n in done)
  progress = Progress(len(todo))
  with open(log, "a") as f:
    for record in _run(todo, workers, detector, photos.root, staging, settings):
      f.write(json.dumps(record) + "\n")
      f.flush()
      records[record["name"]] = record
      skipped += record["status"] != "ok"
      progress.step(skipped)
  current = [records[n] for n in photos.images]
  ok = [r["name"] for r in current if r["status"] == "ok"]
  counts = assemble(output, current, photo_sets.assign(photos, ok, fractions, seed))
  reasons = collections.Counter(r["reason"].split(":")[0].split(" (")[0] for r in current
                                if r["status"] != "ok")
  split_text = ", ".join(f"{s} {n:,}" for s, n in counts.items())
  print(f"prepared {len(ok):,} of {len(current):,} photos: {split_text}", flush=True)
  if reasons:
    print("skipped " + ", ".join(f"{n:,} ({why})" for why, n in reasons.most_common())
          + f"; each listed in {os.path.join(output, REPORT)}", flush=True)
  for s in ("train", "test"):
    if not counts.get(s):
      print(f"warning: split {s} is empty; train.py needs faces in train and test", flush=True)
  config = {"celeba": "celeba_x8.py", "helen": "helen_x8.py"}.get(photos.kind, "default.py")
  print(f"train on it: python train.py --config configs/{config} --config.data.name="
        f"face_folder/{'photos' if photos.kind == 'folder' else photos.kind} "
        f"--config.data.manual_dir={output}", flush=True)
  return counts


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m spadnet_jax.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help="folder of photos (CelebA, Helen or any)")
  p.add_argument("--output", required=True, help="the face_folder manual_dir to write")
  p.add_argument("--split", default=Options.split,
                 help="fractions for a plain folder (CelebA and Helen use the literature's)")
  p.add_argument("--seed", type=int, default=Options.seed, help="orders a plain folder before the split")
  p.add_argument("--detector", default=Options.detector, choices=dlib_models.DETECTORS)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--min_face", type=int, default=Options.min_face,
                 help="smallest crop in photo pixels (smaller faces would be enlarged)")
  p.add_argument("--expand", type=float, default=Options.expand,
                 help="margin added to the face square, as a fraction of its side (DIC: 0.3)")
  p.add_argument("--max_upsample", type=int, default=Options.max_upsample,
                 help="doublings of the photo for the detector's small-face pass")
  p.add_argument("--max_pixels", type=float, default=Options.max_pixels,
                 help="photos whose header declares more pixels are skipped before decoding "
                      "(and listed in the report)")
  p.add_argument("--overwrite", action="store_true",
                 help="write into an --output that holds files prepare did not make (those "
                      "of the names it writes are replaced; nothing else is removed)")
  p.add_argument("--verbosity", type=int, default=0, help="1: tracebacks")
  a = p.parse_args(argv)
  try:
    options = Options(split=a.split, seed=a.seed, detector=a.detector, min_face=a.min_face,
                      expand=a.expand, max_upsample=a.max_upsample, max_pixels=a.max_pixels)
    prepare(a.input, a.output, options, workers=a.workers, overwrite=a.overwrite)
  except (ValueError, OSError, dlib_models.MissingExtra) as e:
    if a.verbosity >= 1:
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1
  except BrokenProcessPool as e:
    print(f"error: a worker process ended abruptly ({e}); what was done is kept, and rerunning "
          "resumes (--workers 1 runs in this process)", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("interrupted: what was done is kept; rerun the same command to resume",
          file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
