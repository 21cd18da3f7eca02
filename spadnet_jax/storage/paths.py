"""Paths that may be object-store URLs (gs://, s3://): one parser for every flag and config
field that names a folder, and the client settings that make such a URL reachable.

A pod's hosts share no disk, so a run's workdir, its checkpoints and its data sets live in
a bucket. Local paths stay plain absolute paths (the os backend: no slower than before);
a URL becomes an etils.epath path served by fsspec (gcsfs for gs://, s3fs for s3://), the
client Orbax also uses, while TensorStore writes the checkpoints' arrays natively. etils
is told to use fsspec rather than TensorFlow's GCS client (EPATH_USE_TF=false) because the
latter has Google's endpoint compiled in: with it, a run's files would follow one route
and tests another.

With STORAGE_EMULATOR_HOST set (a GCS API server, e.g. gcp-storage-emulator on
127.0.0.1), every gs:// access goes there with nothing else to set: client_environment()
derives what TensorStore and gcsfs need from it, including an anonymous token so that no
client looks for Google credentials on the network.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from typing import TYPE_CHECKING, Any, MutableMapping

if TYPE_CHECKING:
  from etils import epath

# Scheme -> (the fsspec client package, the extra that installs it).
SCHEMES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", "s3")}
EMULATOR = "STORAGE_EMULATOR_HOST"


class StorageError(ValueError):
  """A path a user gave that this installation cannot reach (one line)."""


def scheme(path: str | os.PathLike[str]) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  text = os.fspath(path)
  head, sep, _ = text.partition("://")
  return head.lower() if sep and head.isidentifier() else None


def is_url(path: str | os.PathLike[str]) -> bool:
  return scheme(path) is not None


def client_environment(environ: MutableMapping[str, str]) -> dict[str, str]:
  """The variables (not already set) that route object-store clients as this module says:
  etils to fsspec; gcsfs without a listings cache (TensorStore and other processes write
  objects gcsfs never sees: a cached listing would hide a new checkpoint step); and with
  STORAGE_EMULATOR_HOST, TensorStore and gcsfs to that server with test credentials and
  without gcsfs's bucket-type lookup (which stalls there)."""
  gcs: dict[str, object] = {"use_listings_cache": False}
  out = {"EPATH_USE_TF": "false"}
  host = environ.get(EMULATOR)
  if host:
    host = host if "://" in host else f"http://{host}"
    gcs["token"] = "anon"
    out.update({"TENSORSTORE_GCS_HTTP_URL": host, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"})
  out["FSSPEC_GCS"] = json.dumps(gcs)        # fsspec's own variable: its gcs defaults
  return {k: v for k, v in out.items() if k not in environ}


def configure_clients(environ: MutableMapping[str, str] | None = None) -> None:
  """Set client_environment()'s variables, before a client is first used: gcsfs reads its
  own when imported, fsspec its defaults when imported (lazily, on the first URL) or, if it
  already was, here; etils caches its backend choice on the first path of any kind, which
  is forgotten here so that it reads EPATH_USE_TF again."""
  environ = os.environ if environ is None else environ
  added = client_environment(environ)
  environ.update(added)
  gpath = sys.modules.get("etils.epath.gpath")
  if "EPATH_USE_TF" in added and hasattr(getattr(gpath, "_is_tf_installed", None), "cache_clear"):
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  # etils caches the choice
  if "FSSPEC_GCS" in added and "fsspec.config" in sys.modules:
    gcs = sys.modules["fsspec.config"].conf.setdefault("gcs", {})
    for key, value in json.loads(added["FSSPEC_GCS"]).items():
      gcs.setdefault(key, value)


def resolve(path: str | os.PathLike[str], flag: str) -> epath.Path:
  """The path a flag or config field (`flag`, named in errors) gives: a local path made
  absolute, or a URL whose scheme is supported and whose client library is installed.

  StorageError (one line) names the flag, the scheme and what to install.
  """
  from etils import epath  # pylint: disable=import-outside-toplevel  # 45 ms; not on predict's path
  text = os.fspath(path)
  found = scheme(text)
  if found is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if found not in SCHEMES:
    raise StorageError(f"{flag}={text}: unsupported URL scheme {found}:// (supported: "
                       f"{', '.join(f'{s}://' for s in SCHEMES)}, or a local path)")
  package, extra = SCHEMES[found]
  if importlib.util.find_spec(package) is None:
    raise StorageError(f"{flag}={text}: {found}:// needs the {package} package; install it "
                       f"with `pip install -e .[{extra}]` (or `pip install {package}`)")
  configure_clients()
  return epath.Path(text.rstrip("/"))



def filesystem(url: str | os.PathLike[str]) -> tuple[Any, str]:
  """(fsspec file system, path within it) of a URL, the clients routed first."""
  configure_clients()
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.core.url_to_fs(os.fspath(url))


def absolute(path: str | os.PathLike[str]) -> str:
  """A path handed on by code (checked by resolve() where a user gave it), as a string: a
  local path made absolute, a URL as it is."""
  text = os.fspath(path)
  return text.rstrip("/") if is_url(text) else os.path.abspath(text)


def location(path: str | os.PathLike[str]) -> epath.Path:
  """absolute(path) as an etils.epath path."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  return epath.Path(absolute(path))


def list_files(folder: str | os.PathLike[str]) -> dict[str, int]:
  """Every file under `folder` (relative name -> size in bytes); one listing request in an
  object store, a walk on a disk; {} when the folder does not exist."""
  text = os.fspath(folder)
  out: dict[str, int] = {}
  if is_url(text):
    fs, root = filesystem(text)
    root = root.rstrip("/")
    fs.invalidate_cache(root)
    try:
      found = fs.find(root, detail=True)
    except FileNotFoundError:
      return out
    for key, info in found.items():
      if info.get("type", "file") == "file" and key.startswith(root + "/"):
        out[key[len(root) + 1:]] = int(info["size"])
    return out
  for root, dirs, names in os.walk(text):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      out[os.path.relpath(path, text)] = os.path.getsize(path)
  return out


def move(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
  """Move a folder (renamed on a disk; copied object by object, then deleted, in an object
  store, which has no rename)."""
  if is_url(source):
    fs, src = filesystem(source)
    _, dst = filesystem(target)
    fs.copy(src, dst, recursive=True)
    fs.rm(src, recursive=True)
    fs.invalidate_cache()
  else:
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.move(os.fspath(source), os.fspath(target))
