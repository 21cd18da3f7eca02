"""Data: LR kernels, heatmaps, augmentation, tfds builders, bad input and the grain pipeline."""
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from spadnet_jax.data import builders, degrade, landmarks as lmk, pipeline, sources, synthetic
from spadnet_jax.ops import resample
from tests.conftest import REPO


def _cfg(**kw):
  cfg = default.get_config().data
  cfg.update(dict(name="synthetic_faces/tiny", data_dir="", lr_kernel="pil", augment_flip=False,
                  augment_rot90=False, num_threads=1, prefetch=2))
  cfg.update(kw)
  return cfg


def _data(**kw):
  return pipeline.Data(_cfg(**kw))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


# --- LR kernels -------------------------------------------------------------------------

@pytest.mark.parametrize("size_in,size_out", [(128, 16), (128, 32), (128, 8), (16, 128), (37, 11)])
def test_pil_kernel_matches_pillow(rng, size_in, size_out):
  img = rng.random((size_in, size_in)).astype(np.float32)
  ref = np.asarray(Image.fromarray(img, mode="F").resize((size_out, size_out), Image.BICUBIC))
  ours = degrade.resize(img[:, :, None], size_out, "pil")[:, :, 0]
  np.testing.assert_allclose(ours, ref, atol=1e-5)


def _real_photos():
  """128x128 crops of real photos scikit-image ships (no download)."""
  from skimage import data as photos   # pylint: disable=import-outside-toplevel
  crops = []
  for image, (y, x) in ((photos.astronaut(), (60, 170)), (photos.chelsea(), (60, 160)),
                        (photos.coffee(), (100, 200)), (photos.rocket(), (200, 150))):
    crops.append(np.ascontiguousarray(image[y:y + 128, x:x + 128, :3]))
  return crops


@pytest.mark.parametrize("scale", [4, 8, 16])
def test_pil_lr_is_pillows_own_uint8_resize_of_real_photos(scale):
  for hr in _real_photos():
    lr, lr_up = degrade.degrade(hr / 255.0, scale, "pil")
    ref = np.asarray(Image.fromarray(hr).resize((128 // scale,) * 2, Image.BICUBIC))
    assert lr.shape == ref.shape and lr_up.shape == (128, 128, 3)
    np.testing.assert_array_equal(np.round(lr * 255).astype(np.uint8), ref)   # 0 levels apart
    np.testing.assert_allclose(lr_up, np.clip(degrade.resize(lr, 128, "pil"), 0, 1), atol=1e-6)
  # The float re-implementation of the same kernel is not Pillow's 8-bit resize.
  hr = _real_photos()[0]
  ref = np.asarray(Image.fromarray(hr).resize((32, 32), Image.BICUBIC), np.int32)
  floats = np.round(np.clip(degrade.resize(hr / 255.0, 32, "pil"), 0, 1) * 255).astype(np.int32)
  assert np.abs(floats - ref).max() >= 1


def test_matlab_kernel_properties():
  # MATLAB imresize (bicubic, antialiased) keeps constants and, away from the border,
  # linear ramps: the mean of each 2-pixel cell when halving.
  ramp = np.tile(np.arange(32, dtype=np.float32)[None, :, None], (32, 1, 1))
  half = degrade.resize(ramp, 16, "matlab")[0, :, 0]
  np.testing.assert_allclose(half[2:-2], np.arange(16)[2:-2] * 2 + 0.5, atol=1e-5)
  np.testing.assert_allclose(degrade.resize(np.full((32, 32, 1), 0.3, np.float32), 8, "matlab"), 0.3,
                             atol=1e-6)
  m = resample.resize_matrix(8, 4, "matlab_bicubic")
  # Symmetric borders: the first output sees input 0 mirrored (weights folded onto 0, 1).
  w = resample.cubic_kernel((np.arange(-3, 5) + 0.5 - 1.0) * 0.5, -0.5)
  w = w / w.sum()
  expected = np.zeros(8)
  for tap, weight in zip(np.arange(-3, 5), w):
    expected[-tap - 1 if tap < 0 else tap] += weight
  np.testing.assert_allclose(m[0], expected, atol=1e-6)
  pil = resample.resize_matrix(8, 4, "pil_bicubic")
  assert not np.allclose(pil[0], m[0])   # Pillow clips the window instead


def test_unknown_lr_kernel_is_named():
  with pytest.raises(ValueError, match="unknown LR kernel 'opencv'"):
    degrade.resize(np.zeros((8, 8, 1), np.float32), 4, "opencv")


# --- heatmaps and geometry ----------------------------------------------------------------

def test_heatmaps_match_official_formula_with_x_and_y_right(rng):
  pts = rng.uniform(5, 120, (68, 2)).astype(np.float32)
  ours = lmk.heatmaps(pts)
  yy, xx = np.mgrid[0:128, 0:128]
  for g, idx in enumerate(lmk.GROUPS):
    ref = sum(np.exp(-((xx - pts[i, 0]) ** 2 + (yy - pts[i, 1]) ** 2) / 2.0) for i in idx)
    np.testing.assert_allclose(ours[:, :, g], ref, atol=1e-5)
  one = lmk.heatmaps(np.array([[100.0, 20.0]] * 68, np.float32), groups=((0,),))
  assert np.unravel_index(one[:, :, 0].argmax(), (128, 128)) == (20, 100)   # (row=y, col=x)


def test_mirror_permutation_is_an_involution():
  assert sorted(lmk.MIRROR) == list(range(68))
  np.testing.assert_array_equal(lmk.MIRROR[lmk.MIRROR], np.arange(68))
  assert lmk.MIRROR[36] == 45 and lmk.MIRROR[30] == 30 and lmk.MIRROR[0] == 16


def test_flip_swaps_eye_groups_and_mirrors():
  image, pts = synthetic.draw_face(3)
  flipped, fpts = lmk.hflip(image, pts)
  np.testing.assert_array_equal(flipped, image[:, ::-1])
  h, hf = lmk.heatmaps(pts), lmk.heatmaps(fpts)
  np.testing.assert_allclose(hf[:, :, 0], h[:, ::-1, 1], atol=1e-5)   # left eye <- right eye
  np.testing.assert_allclose(hf[:, :, 1], h[:, ::-1, 0], atol=1e-5)
  np.testing.assert_allclose(hf[:, :, 2:], h[:, ::-1, 2:], atol=1e-5)
  assert fpts[36:42, 0].mean() < fpts[42:48, 0].mean()   # left-eye group stays on the left


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rot90_moves_landmarks_with_the_image(k):
  image, pts = synthetic.draw_face(4)
  rot, rpts = lmk.rot90(image, pts, k)
  np.testing.assert_array_equal(rot, np.rot90(image, k, axes=(0, 1)))
  np.testing.assert_allclose(lmk.heatmaps(rpts), np.rot90(lmk.heatmaps(pts), k, axes=(0, 1)),
                             atol=1e-5)


# --- synthetic faces ----------------------------------------------------------------------

def test_synthetic_faces_are_deterministic_and_landmarks_inside():
  a, pa = synthetic.draw_face(11)
  b, pb = synthetic.draw_face(11)
  c, _ = synthetic.draw_face(12)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(pa, pb)
  assert a.shape == (128, 128, 3) and a.dtype == np.uint8 and not np.array_equal(a, c)
  assert pa.shape == (68, 2) and (pa > 0).all() and (pa < 127).all()
  # The eyes are drawn where their landmarks say: brighter sclera than the skin around.
  eye = pa[36:42].mean(0).round().astype(int)
  assert a[eye[1], eye[0]].astype(int).sum() != a[eye[1] + 12, eye[0]].astype(int).sum()


@pytest.mark.slow
def test_synthetic_builder_registered_and_read_without_tf(tfds_dir):
  builder = tfds.builder("synthetic_faces/tiny", data_dir=tfds_dir, file_format="array_record")
  builder.download_and_prepare()
  src = builder.as_data_source("test")
  assert len(src) == 20
  ex = src[0]
  assert ex["hr"].shape == (128, 128, 3) and ex["landmarks"].shape == (68, 2)
  name = ex["filename"].decode() if isinstance(ex["filename"], bytes) else ex["filename"]
  seed = int(name[len("face_"):-len(".png")])
  assert seed >= 10_000_000                       # test faces never reuse train seeds
  img, pts = synthetic.draw_face(seed)
  np.testing.assert_array_equal(ex["hr"], img)
  np.testing.assert_allclose(ex["landmarks"], pts)
  # A fresh interpreter reads the data set without loading TensorFlow.
  code = ("import sys, tensorflow_datasets as tfds, spadnet_jax.data; "
          f"b = tfds.builder('synthetic_faces/tiny', data_dir={tfds_dir!r}, file_format='array_record'); "
          "b.download_and_prepare(); x = b.as_data_source('train')[0]; "
          "assert x['hr'].shape == (128, 128, 3); assert 'tensorflow' not in sys.modules, 'TF loaded'")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-2000:]


# --- pipeline -----------------------------------------------------------------------------

def test_train_batches_have_the_contract(tfds_dir):
  it = iter(pipeline.train_dataset(_data(data_dir=tfds_dir, augment_flip=True, augment_rot90=True),
                                   scale=8, global_batch=4, seed=0))
  b = next(it)
  assert b["hr"].shape == (4, 128, 128, 3) and b["lr"].shape == (4, 16, 16, 3)
  assert b["lr_up"].shape == (4, 128, 128, 3) and b["heatmap"].shape == (4, 128, 128, 5)
  for k in ("hr", "lr", "lr_up"):
    assert b[k].dtype == np.float32 and b[k].min() >= 0 and b[k].max() <= 1
  assert b["filename"].shape == (4,) and str(b["filename"][0]).endswith(".png")
  lr, lr_up = degrade.degrade(b["hr"][0], 8, "pil")
  np.testing.assert_allclose(b["lr"][0], lr, atol=1e-6)
  np.testing.assert_allclose(b["lr_up"][0], lr_up, atol=1e-6)


def test_train_iterator_resumes_from_a_global_position(tfds_dir):
  cfg = _data(data_dir=tfds_dir, augment_flip=True, augment_rot90=True)
  it = iter(pipeline.train_dataset(cfg, 4, 8, seed=3))
  for _ in range(7):                     # past the first epoch of 48 faces (6 batches)
    next(it)
  expected = [next(it) for _ in range(3)]
  it2 = iter(pipeline.train_dataset(cfg, 4, 8, seed=3, start=7 * 8))
  for want in expected:
    got = next(it2)
    np.testing.assert_array_equal(got["hr"], want["hr"])
    np.testing.assert_array_equal(got["heatmap"], want["heatmap"])
  # Another global batch size resumes at the same example: two batches of 4 are one of 8.
  it4 = iter(pipeline.train_dataset(cfg, 4, 4, seed=3, start=7 * 8))
  got = np.concatenate([next(it4)["hr"], next(it4)["hr"]])
  np.testing.assert_array_equal(got, expected[0]["hr"])


def test_processes_read_their_rows_of_each_global_batch(tfds_dir, monkeypatch):
  cfg = _data(data_dir=tfds_dir, augment_flip=True)
  one = iter(pipeline.train_dataset(cfg, 8, 8, seed=1, start=40))
  whole = [next(one) for _ in range(3)]
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    it = iter(pipeline.train_dataset(cfg, 8, 8, seed=1, start=40))
    parts.append([next(it) for _ in range(3)])
  for k in range(3):
    for key in ("hr", "heatmap", "lr_up"):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])


def test_epochs_are_reshuffled(tfds_dir):
  it = iter(pipeline.train_dataset(_data(data_dir=tfds_dir), 8, 48, seed=0))
  e1, e2 = next(it)["filename"], next(it)["filename"]
  assert sorted(e1) == sorted(e2) and list(e1) != list(e2)


def test_processes_read_disjoint_shards(tfds_dir, monkeypatch):
  names = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    ds, count = pipeline.eval_dataset(_data(data_dir=tfds_dir), 8, "test", 4)
    names.append([str(n) for b in ds for n in b["filename"]])
    assert count == 10
  assert not set(names[0]) & set(names[1]) and len(set(names[0]) | set(names[1])) == 20
  with pytest.raises(ValueError, match="batch_size=3 is not divisible by the 2 processes"):
    pipeline.local_batch_size(3)


def test_eval_dataset_keeps_order_and_last_short_batch(tfds_dir):
  ds, count = pipeline.eval_dataset(_data(data_dir=tfds_dir), 4, "test", 8)
  sizes = [len(b["hr"]) for b in ds]
  assert count == 20 and sizes == [8, 8, 4]
  assert next(iter(ds))["lr"].shape == (8, 32, 32, 3)


def test_unknown_data_set_and_split_are_named(tfds_dir):
  with pytest.raises(ValueError, match=r"config.data.name='nope_faces' is not a registered data "
                     r"source; registered: \['celeb_a', 'face_folder', 'synthetic_faces'"):
    _data(name="nope_faces", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="'synthetic_faces/nope' is not a known tfds data set"):
    _data(name="synthetic_faces/nope", data_dir=tfds_dir)
  with pytest.raises(ValueError, match="has no split 'validation'"):
    _data(data_dir=tfds_dir).raw("validation")


def test_celeb_a_adapter_with_mocked_tfds():
  with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
    data = _data(name="celeb_a")
    raw = data.raw("train")[0]
  groups = data.source.groups
  assert groups == sources.CELEBA_GROUPS and list(data.source.mirror) == [1, 0, 2, 4, 3]
  assert raw["hr"].shape == (128, 128, 3) and raw["landmarks"].shape == (5, 2)
  ex = pipeline.make_example(raw["hr"], raw["landmarks"], "x.jpg", 8, groups=groups)
  assert ex["heatmap"].shape == (128, 128, 5) and np.all(ex["heatmap"][:, :, 4] == 0)


def test_celeb_a_crop_maps_landmarks():
  ex = {"image": np.zeros((218, 178, 3), np.uint8), "filename": "a.jpg",
        "landmarks": {f"{p}_{a}": v for p in sources.CELEBA_POINTS
                      for a, v in (("x", 88.5), ("y", 108.5))}}
  out = sources.celeba_example(ex)
  # The centre of the 178x178 crop (88.5, 20 + 88.5) lands at the 128x128 centre.
  assert out["hr"].shape == (128, 128, 3)
  np.testing.assert_allclose(out["landmarks"], 63.5, atol=1e-4)


# --- the DIC / SPADNet folder layout --------------------------------------------------------

def _write_folder(root, bad=None):
  table = {}
  for split, seeds in (("train", range(4)), ("test", range(100, 102))):
    hr = root / split / "HR"
    hr.mkdir(parents=True)
    entries = {}
    for i, seed in enumerate(seeds):
      image, pts = synthetic.draw_face(seed)
      name = f"{seed:05d}.png"
      if i == 0:      # DIC layout: a full image, bbox and full-image landmarks
        full = np.zeros((200, 180, 3), np.uint8)
        full[30:158, 20:148] = image
        Image.fromarray(full).save(hr / name)
        entries[name] = {"landmark": pts + [20, 30], "bbox": [20, 30, 148, 158]}
      else:
        Image.fromarray(image).save(hr / name)
        entries[name] = [pts] if i == 1 else pts   # official train pickles wrap in a list
      table[(split, name)] = (image, pts)
    if bad and split == "train":
      bad(hr, entries)
    with open(root / split / "landmark.pkl", "wb") as f:
      pickle.dump(entries, f)
  return table


def _build(root, data_dir, **kw):
  builder = tfds.builder("face_folder/helen", data_dir=str(data_dir), file_format="array_record", **kw)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
  return builder


def test_face_folder_reads_all_layouts(tmp_path):
  table = _write_folder(tmp_path / "manual")
  builder = _build(tmp_path / "manual", tmp_path / "tfds")
  src = builder.as_data_source("train")
  assert len(src) == 4 and len(builder.as_data_source("test")) == 2
  for ex in src:
    image, pts = table[("train", ex["filename"].decode() if isinstance(ex["filename"], bytes) else ex["filename"])]
    np.testing.assert_allclose(ex["landmarks"], pts, atol=1e-4)
    np.testing.assert_array_equal(ex["hr"], image)


def _bad_cases():
  def truncated(hr, entries):
    data = (hr / "00001.png").read_bytes()
    (hr / "00001.png").write_bytes(data[: len(data) // 2])
  def wrong_size(hr, entries):
    Image.new("RGB", (100, 100)).save(hr / "00002.png")
  def no_entry(hr, entries):
    entries.pop("00003.png")
  def outside(hr, entries):
    entries["00002.png"] = np.full((68, 2), 140.0, np.float32)
  def nan(hr, entries):
    pts = np.asarray(entries["00003.png"], np.float32).copy()
    pts[30] = [np.nan, 64.0]
    entries["00003.png"] = pts
  def inf(hr, entries):
    entries["00000.png"]["landmark"][5, 1] = np.inf     # the bbox entry
  def bbox_outside(hr, entries):
    entries["00000.png"]["bbox"] = [-5, 30, 148, 158]
  def bbox_three(hr, entries):
    entries["00000.png"]["bbox"] = [20, 30, 148]
  return [(truncated, r"00001.png: unreadable or truncated image"),
          (wrong_size, r"00002.png: image is 100x100, expected 128x128"),
          (no_entry, r"00003.png: no entry for '00003.png'"),
          (outside, r"00002.png: landmark 0 at \(140.0, 140.0\) lies outside"),
          (nan, r"00003.png: landmark 30 is not finite \(nan, 64.0\)"),
          (inf, r"00000.png: landmark 5 is not finite \(.*, inf\)"),
          (bbox_outside, r"00000.png: bbox \[-5.0, 30.0, 148.0, 158.0\] reaches outside the "
                         r"180x200 image"),
          (bbox_three, r"00000.png: bbox \[20, 30, 148\] is not 4 numbers")]


@pytest.mark.parametrize("bad,message", _bad_cases(),
                         ids=["truncated", "size", "entry", "outside", "nan", "inf",
                              "bbox_outside", "bbox_three"])
def test_bad_input_is_named_or_skipped(tmp_path, capsys, bad, message):
  _write_folder(tmp_path / "manual", bad=bad)
  with pytest.raises(builders.BadExample, match=message):
    _build(tmp_path / "manual", tmp_path / "tfds")
  builder = _build(tmp_path / "manual", tmp_path / "tfds2", skip_bad_examples=True)
  assert len(builder.as_data_source("train")) == 3
  assert "skipped 1 bad examples" in capsys.readouterr().out


def test_grayscale_and_rgba_faces_are_converted_and_counted(tmp_path, capsys):
  def modes(hr, entries):
    Image.open(hr / "00002.png").convert("L").save(hr / "00002.png")
    Image.open(hr / "00003.png").convert("RGBA").save(hr / "00003.png")
  _write_folder(tmp_path / "manual", bad=modes)
  builder = _build(tmp_path / "manual", tmp_path / "tfds")
  assert len(builder.as_data_source("train")) == 4
  assert "converted to RGB in" in capsys.readouterr().out
  name = lambda e: e["filename"].decode() if isinstance(e["filename"], bytes) else e["filename"]
  ex = {name(e): e for e in builder.as_data_source("train")}
  gray = ex["00002.png"]["hr"]
  assert gray.shape == (128, 128, 3) and (gray[..., 0] == gray[..., 1]).all()


def test_a_prepared_copy_from_another_source_is_refused(tmp_path):
  _write_folder(tmp_path / "a")
  _write_folder(tmp_path / "b")
  cfg = _cfg(name="face_folder/helen", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "a"),
             skip_bad_examples=False)
  pipeline.Data(cfg)
  pipeline.Data(cfg)                                   # same source: reused
  cfg.manual_dir = str(tmp_path / "b")
  with pytest.raises(ValueError, match=r"was built from another source \(manual_dir: built "
                     r"'.*/a', now '.*/b'.*delete that folder"):
    pipeline.Data(cfg)
  cfg.manual_dir, cfg.skip_bad_examples = str(tmp_path / "a"), True
  with pytest.raises(ValueError, match=r"skip_bad_examples: built False, now True"):
    pipeline.Data(cfg)
  os.utime(tmp_path / "a" / "train" / "HR" / "00001.png", ns=(1, 1))  # the source changed
  cfg.skip_bad_examples = False
  with pytest.raises(ValueError, match=r"fingerprint: built"):
    pipeline.Data(cfg)


def test_missing_split_folder_is_named(tmp_path):
  (tmp_path / "manual" / "train" / "HR").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match=r"manual/train/landmark.pkl is missing"):
    _build(tmp_path / "manual", tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match=r"split folder .*manual/test/HR is missing"):
    (tmp_path / "manual" / "train" / "landmark.pkl").write_bytes(pickle.dumps({}))
    _build(tmp_path / "manual", tmp_path / "tfds")
