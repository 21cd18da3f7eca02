"""Files from strangers: landmark pickles, .npz weights, edited checkpoints, images and the
folders a user points the tools at. Each case is tried as a hostile or careless user would:
the payload's file must not appear, the user's bytes must not change, refusals come in one
line and within seconds, memory stays bounded."""
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
import zlib

import jax
import numpy as np
import pytest
from PIL import Image

from spadnet_jax import checkpoint, convert, models, predict, prepare
from spadnet_jax.data import builders, synthetic
from spadnet_jax.untrusted import arrays, images, pickles
from tests.conftest import REPO, fixture_path
from tests.test_data import _build, _write_folder

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _tree(root):
  """Every file under root with its bytes."""
  return {os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
          for d, _, names in os.walk(root) for n in names}


# --- landmark pickles ----------------------------------------------------------------------

class _Payload:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_a_landmark_pickle_that_runs_code_is_refused_by_name_and_never_run(tmp_path):
  marker = tmp_path / "payload_ran"
  _write_folder(tmp_path / "manual")
  pkl = tmp_path / "manual" / "train" / "landmark.pkl"
  entries = pickle.load(open(pkl, "rb"))
  entries["00001.png"] = _Payload(marker)
  pkl.write_bytes(pickle.dumps(entries))
  with pytest.raises(builders.BadExample, match=rf"^{pkl}: refused to load posix\.system: a "
                     "landmark file holds only arrays, lists and dicts$"):
    _build(tmp_path / "manual", tmp_path / "tfds")
  assert not marker.exists()
  pickle.loads(pkl.read_bytes())        # the file really is a payload: plain pickle runs it
  assert marker.exists()


def _py2_pickle(points: np.ndarray) -> bytes:
  """{'a.png': points} as Python 2's cPickle (protocol 2) with NumPy 1 wrote it: module
  numpy.core, byte strings as str (read back as latin-1)."""
  data = np.ascontiguousarray(points, "<f4").tobytes()
  shape = b"".join(b"K" + bytes([n]) for n in points.shape) + b"\x86"
  dtype = (b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R"
           b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
  array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
           b"(K\x01" + shape + dtype + b"\x89T" + struct.pack("<i", len(data)) + data + b"tb")
  return b"\x80\x02}U\x05a.png" + array + b"s."


def _numpy1_paths(data: bytes) -> bytes:
  """A pickle NumPy 2 wrote, with NumPy 1's module paths (numpy.core.*): in GLOBAL text and
  in protocol 4's length-prefixed strings, the one frame's length adjusted."""
  new = data
  for module in (b"multiarray", b"numeric"):
    was, now = b"numpy._core." + module, b"numpy.core." + module
    new = new.replace(bytes([0x8c, len(was)]) + was, bytes([0x8c, len(now)]) + now)
  new = new.replace(b"numpy._core.", b"numpy.core.")
  if data[:3] in (b"\x80\x04\x95", b"\x80\x05\x95"):
    length = int.from_bytes(data[3:11], "little") - (len(data) - len(new))
    new = new[:3] + length.to_bytes(8, "little") + new[11:]
  return new


def _layouts(points):
  return {"array": points, "official_train": points[None].astype(np.float64),
          "list": points.tolist(), "wrapped_list": [points],
          "dic": {"landmark": points + 5, "bbox": [np.float32(1.5), 2, np.int64(3), 4.0]}}


@pytest.mark.parametrize("protocol", range(6))
def test_every_known_landmark_layout_loads_in_every_protocol(tmp_path, protocol):
  points = synthetic.draw_face(0)[1]
  table = _layouts(points)
  path = tmp_path / "landmark.pkl"
  path.write_bytes(pickle.dumps(table, protocol=protocol))
  loaded = pickles.load(str(path))
  assert sorted(loaded) == sorted(table)
  for name in table:
    got = loaded[name]["landmark"] if name == "dic" else loaded[name]
    want = table[name]["landmark"] if name == "dic" else table[name]
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  assert [float(v) for v in loaded["dic"]["bbox"]] == [1.5, 2, 3, 4]
  # NumPy 1 wrote numpy.core where NumPy 2 writes numpy._core: both load.
  path.write_bytes(_numpy1_paths(pickle.dumps(table, protocol=protocol)))
  np.testing.assert_array_equal(pickles.load(str(path))["array"], points)


def test_python2_pickles_load_as_latin1(tmp_path):
  points = synthetic.draw_face(3)[1]
  path = tmp_path / "landmark.pkl"
  path.write_bytes(_py2_pickle(points))
  np.testing.assert_array_equal(pickles.load(str(path))["a.png"], points)


@pytest.mark.parametrize("body,refused", [
    (b"cnumpy\nndarray\n(\x8a\x05" + (10**12).to_bytes(5, "little") + b"\x85tR.",
     "refused to call numpy.ndarray directly"),
    (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xe8v\x48\x85U\x01b\x87R.",
     "refused an array declared with shape"),
    (b"cnumpy\ndtype\nU\x02O8K\x00K\x01\x87R.", "refused the array type"),
    (b"cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "refused to load builtins.eval"),
    (b"csubprocess\nPopen\n.", "refused to load subprocess.Popen"),
])
def test_a_pickle_cannot_allocate_a_declared_size_or_reach_any_other_callable(tmp_path, body, refused):
  path = tmp_path / "landmark.pkl"
  path.write_bytes(b"\x80\x02" + body)
  with pytest.raises(ValueError, match=rf"^{path}: .*{refused}"):
    pickles.load(str(path))


# --- .npz weights and edited checkpoints ------------------------------------------------------

def _npz(path, members):
  with zipfile.ZipFile(path, "w") as z:
    for name, raw in members.items():
      z.writestr(name + ".npy", raw)


def _npy_header(shape, descr="<f4"):
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
  return buf.getvalue()


def test_npz_members_are_checked_against_their_declared_sizes_before_reading(tmp_path):
  path = tmp_path / "w.npz"
  _npz(path, {"a": _npy_header((100_000, 100_000)) + b"\0" * 16})
  with pytest.raises(ValueError, match=r"member a.npy declares \(100000, 100000\) float32 "
                     r"\(40,000,000,000 bytes\) but holds \d+ bytes"):
    arrays.load_npz(str(path))
  buf = io.BytesIO()
  np.save(buf, np.array([{"x": 1}], dtype=object), allow_pickle=True)
  _npz(path, {"o": buf.getvalue()})
  with pytest.raises(ValueError, match=r"member o.npy holds Python objects"):
    arrays.load_npz(str(path))
  good = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int64)}
  np.savez(path, **good)
  loaded = arrays.load_npz(str(path))
  assert sorted(loaded) == ["a", "b"] and all(np.array_equal(loaded[k], good[k]) for k in good)


def _convert(*args):
  return subprocess.run([sys.executable, "-m", "spadnet_jax.convert", *map(str, args)], cwd=REPO,
                        capture_output=True, text=True, env=ENV, timeout=120)


@pytest.mark.slow
def test_convert_refuses_a_stray_block_key_and_non_finite_weights_by_name(tmp_path):
  sd = convert.load_state_dict(fixture_path("official_x4_small"))
  stray = tmp_path / "stray.npz"
  np.savez(stray, **sd, **{"SR_branch1.99999.body.0.weight": np.zeros(1, np.float32)})
  r = _convert(stray, tmp_path / "out1")
  assert r.returncode == 1 and r.stderr.strip() == (
      "error: official state dict has SR_branch1.99999.body.0.weight but no SR_branch block 2: "
      "blocks must be numbered 0 to n-1"), r.stderr
  nan = dict(sd)
  nan["hab_branch2.0.conv3.weight"] = sd["hab_branch2.0.conv3.weight"].copy()
  nan["hab_branch2.0.conv3.weight"][0, 0, 0, 0] = np.nan
  with pytest.raises(ValueError, match=r"non-finite values \(NaN or inf\) in "
                     r"hab_branch2\.0\.conv3\.weight: refusing"):
    convert.from_official(nan)
  assert not (tmp_path / "out1").exists()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A tiny x8 model's inference checkpoint (initial weights: predict only needs a model)."""
  model = models.SPADNet(scale=8, n_feats=4, number=2, reduction=2, pac_impl="fused")
  variables = model.init(jax.random.key(0), model.example_input())
  root = tmp_path_factory.mktemp("ckpt") / "checkpoint"
  checkpoint.save_inference_checkpoint(str(root), model, variables)
  return root


def _edited(tiny_checkpoint, tmp_path, **fields):
  """A copy of the checkpoint whose model configuration says `fields`, checksums recomputed
  (as anyone sending a file can)."""
  import shutil
  root = tmp_path / "edited"
  shutil.copytree(tiny_checkpoint, root)
  meta = root / "0" / "model" / "metadata"
  meta.write_text(json.dumps({**json.loads(meta.read_text()), **fields}))
  checkpoint.seal(str(root), 0)
  assert checkpoint.verify(str(root), 0)
  return root


@pytest.mark.parametrize("fields,message", [
    ({"number": 1000}, r"SPADNet\.number must be in \[1, 96\], got 1000"),
    ({"number": 7}, r"does not match its model configuration \(scale 8, number 7, hab_num 6, "
                    r"heatmap_branch True\): 45 modules missing \['stage1_hab1'"),
    ({"heatmap_branch": False}, r"does not match .* 0 modules missing \[\], 10 unexpected "
                                r"\['hm_out', 'stage1_hm0'"),
    ({"n_feats": 4.5}, r"SPADNet\.n_feats must be an integer, got 4\.5"),
    ({"n_feats": 100000}, r"SPADNet\.n_feats must be in \[1, 1024\], got 100000"),
    ({"reduction": 0}, r"SPADNet\.reduction must be in \[1, n_feats=4\], got 0"),
    ({"scale": "8"}, r"SPADNet\.scale must be an integer, got '8'"),
    ({"use_lsac": "yes"}, r"SPADNet\.use_lsac must be true or false, got 'yes'"),
], ids=["number_absurd", "number_mismatch", "branch", "n_feats_float", "n_feats_absurd",
        "reduction_zero", "scale_text", "switch_text"])
def test_an_edited_model_configuration_is_refused_naming_the_field(tiny_checkpoint, tmp_path,
                                                                   fields, message):
  root = _edited(tiny_checkpoint, tmp_path, **fields)
  with pytest.raises(checkpoint.DamagedCheckpoint, match=rf"checkpoint step 0 in {root} cannot "
                     rf"be restored \(.*{message}"):
    checkpoint.load_model(str(root))


@pytest.mark.slow
def test_predict_refuses_an_absurd_checkpoint_in_one_line_within_seconds(tiny_checkpoint, tmp_path):
  root = _edited(tiny_checkpoint, tmp_path, number=1_000_000)
  src = tmp_path / "in"
  src.mkdir()
  Image.fromarray(synthetic.draw_face(1)[0]).resize((16, 16)).save(src / "face.png")
  r = subprocess.run([sys.executable, "-m", "spadnet_jax.predict", f"--checkpoint={root}",
                      f"--input={src}", f"--output={tmp_path / 'out'}"], cwd=REPO,
                     capture_output=True, text=True, env=ENV, timeout=60)
  assert r.returncode == 1 and r.stderr.strip() == (
      f"error: checkpoint step 0 in {root} cannot be restored (SPADNet.number must be in "
      "[1, 96], got 1000000)"), r.stderr


def test_submodule_names_are_the_modules_init_makes():
  for fields in (dict(scale=4, number=3, hab_num=1), dict(scale=16, number=2, heatmap_branch=False)):
    model = models.SPADNet(n_feats=4, reduction=2, **fields)
    assert set(checkpoint.abstract_variables(model)["params"]) == model.submodule_names()


# --- images --------------------------------------------------------------------------------

def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_black_png(path, side: int) -> None:
  """A valid side x side RGB PNG of black pixels, compressed row by row (13000 x 13000 takes
  about 0.5 MB on disk and 0.5 GB decoded)."""
  z, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * side), []
  for _ in range(side):
    parts.append(z.compress(row))
  parts.append(z.flush())
  ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_clipped(tmp_path):
  values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
  Image.fromarray(values).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode == "I;16"
  decoded = images.load_rgb(str(tmp_path / "g16.png"), 1e6, "--max_pixels")
  got = np.asarray(decoded.image)
  expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  assert decoded.mode == "I;16" and got.shape == (64, 64, 3)
  np.testing.assert_array_equal(got[..., 0], expected)
  assert (got == 255).mean() < 0.01        # convert("RGB") made 99% of them 255
  lr, _ = predict.load_lr(str(tmp_path / "g16.png"), 16)
  assert 0.2 < lr.mean() < 0.8
  Image.fromarray(np.ones((8, 8), np.float32)).save(tmp_path / "f.tif")
  with pytest.raises(ValueError, match=r"f\.tif: 32-bit floating-point image"):
    images.load_rgb(str(tmp_path / "f.tif"), 1e6, "--max_pixels")


def test_an_image_over_the_limit_is_refused_from_its_header_and_a_large_jpeg_decoded_reduced(tmp_path):
  write_black_png(tmp_path / "bomb.png", 13000)
  assert os.path.getsize(tmp_path / "bomb.png") < 1 << 20
  with pytest.raises(ValueError, match=rf"^{tmp_path}/bomb\.png: image is 13000x13000 \(169 "
                     r"megapixels\), over the 100 megapixels limit \(--max_pixels\)$"):
    images.load_rgb(str(tmp_path / "bomb.png"), 100e6, "--max_pixels", min_side=16)
  face = Image.fromarray(synthetic.draw_face(2)[0]).resize((1024, 1024), Image.BICUBIC)
  face.save(tmp_path / "face.jpg", quality=95)
  img, note = predict.load_lr(str(tmp_path / "face.jpg"), 16, max_pixels=300_000)
  assert img.shape == (16, 16, 3)
  assert note.startswith("decoded at 1/2 scale (512x512; the file is 1024x1024, over the 0.3 "
                         "megapixels limit (--max_pixels)); reduced from 512x512 to 16x16")
  full, _ = predict.load_lr(str(tmp_path / "face.jpg"), 16)
  assert np.abs(img - full).mean() < 0.02
  with pytest.raises(ValueError, match=r"face\.jpg: image is 1024x1024 .* over the 0\.001 "
                     r"megapixels limit"):
    predict.load_lr(str(tmp_path / "face.jpg"), 16, max_pixels=1000)   # 1/8 is under 16 px


_PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
         "sys.exit(r.returncode)")


@pytest.mark.slow
def test_predict_on_a_folder_with_a_decompression_bomb_writes_the_good_face_in_bounded_memory(
    tiny_checkpoint, tmp_path):
  src = tmp_path / "in"
  src.mkdir()
  write_black_png(src / "bomb.png", 13000)
  Image.fromarray(synthetic.draw_face(1)[0]).resize((16, 16), Image.BICUBIC).save(src / "face.png")
  before = _tree(src)
  r = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "spadnet_jax.predict",
                      f"--checkpoint={tiny_checkpoint}", f"--input={src}",
                      f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True,
                     env=ENV, timeout=300)
  *err, peak_kib = r.stderr.strip().splitlines()
  assert r.returncode == 1 and err == [
      f"error: {src}/bomb.png: image is 13000x13000 (169 megapixels), over the 16 megapixels "
      "limit (--max_pixels)", "1 of 2 files failed"], r.stderr
  assert os.listdir(tmp_path / "out") == ["face.png"]
  assert int(peak_kib) < 1.5 * 2**20, f"peak {int(peak_kib) / 2**20:.2f} GiB"
  assert _tree(src) == before


# --- folders the tools write into ----------------------------------------------------------

def test_predict_never_writes_over_its_input(tmp_path, capsys):
  src = tmp_path / "faces"
  src.mkdir()
  Image.fromarray(synthetic.draw_face(1)[0]).resize((16, 16)).save(src / "a.png")
  before = _tree(src)
  for args, message in [
      ((src, src), f"--output {src} is inside --input {src}: the results would mix"),
      ((src, src / "sr"), f"--output {src / 'sr'} is inside --input {src}"),
      ((src / "a.png", src), f"--output {src}: writing a.png would replace the input image "
                             f"{src / 'a.png'}; choose another --output"),
  ]:
    for faces in ([], ["--faces"]):
      code = predict.main(["--checkpoint", str(tmp_path / "none"), "--input", str(args[0]),
                           "--output", str(args[1]), *faces])
      err = capsys.readouterr().err
      assert code == 1 and err.startswith(f"error: {message}"), err
  assert _tree(src) == before


@pytest.fixture
def dlib_or_skip():
  from spadnet_jax.faces import dlib_models
  try:
    dlib_models.model_path(dlib_models.LANDMARKS_FILE)
  except dlib_models.MissingExtra as e:
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(str(e))
    pytest.skip(str(e))


def test_prepare_refuses_a_data_set_it_did_not_make_and_removes_only_its_own(
    dlib_or_skip, tmp_path, capsys):
  del dlib_or_skip
  photos = tmp_path / "photos"
  photos.mkdir()
  Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(photos / "wall.png")   # no face
  dic = tmp_path / "dic"
  _write_folder(dic)
  (dic / "val").mkdir()
  (dic / "val" / "landmark.pkl").write_bytes(pickle.dumps({}))
  before = _tree(dic)
  args = ["--input", str(photos), "--output", str(dic), "--workers", "1"]
  assert prepare.main(args) == 1
  err = capsys.readouterr().err
  assert err == (f"error: --output {dic} holds 9 files prepare did not make (e.g. "
                 "test/HR/00100.png): choose a new or empty folder, or add --overwrite to write "
                 "into it (files of the names prepare writes are then replaced; nothing else is "
                 "removed)\n")
  assert _tree(dic) == before and not (dic / prepare.WORK).exists()
  assert prepare.main(args + ["--overwrite"]) == 0
  after = _tree(dic)
  replaced = {"train/landmark.pkl", "test/landmark.pkl"}     # val/ is not a split it writes
  assert {k: v for k, v in after.items() if k in before and k not in replaced} == \
      {k: v for k, v in before.items() if k not in replaced}
  assert {k.split("/")[0] for k in set(after) - set(before)} == {prepare.REPORT, prepare.WORK}
  # What it did not write is still not its own: the next run without --overwrite is refused.
  (dic / "train" / "HR" / "mine.png").write_bytes(b"mine")
  assert prepare.main(args) == 1
  assert "holds 8 files prepare did not make (e.g. test/HR/00100.png)" in capsys.readouterr().err
  assert (dic / "train" / "HR" / "mine.png").read_bytes() == b"mine"


def test_prepare_follows_no_path_its_work_folder_names(tmp_path, capsys):
  """.prepare/ travels with a prepared folder: what it names is checked, never followed."""
  out = tmp_path / "out"
  (out / prepare.WORK).mkdir(parents=True)
  victim = tmp_path / "victim.txt"
  victim.write_text("mine")
  good = {"name": "a.jpg", "out": "a.png", "stat": [1, 2], "version": prepare.VERSION,
          "status": "ok", "landmarks": synthetic.draw_face(0)[1].tolist()}
  bad = [{**good, "name": "b.jpg", "out": "../../victim.txt"},
         {**good, "name": "c.jpg", "out": "c.png", "landmarks": [[0, 0]] * 67},
         {**good, "name": "d.jpg", "out": "d.png", "landmarks": "x"}]
  records = out / prepare.WORK / "records.jsonl"
  records.write_text("".join(json.dumps(r) + "\n" for r in [good, *bad]))
  assert list(prepare.read_records(str(records))) == ["a.jpg"]
  (out / prepare.WORK / prepare.WRITTEN).write_text(json.dumps(["a.png", "../victim.txt"]))
  with pytest.raises(ValueError, match=r"written.json is damaged: it names '\.\./victim\.txt', "
                     "not a file prepare writes inside the folder"):
    prepare.owned(str(out))
  assert victim.read_text() == "mine"
