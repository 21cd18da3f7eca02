"""What train.py and eval.py share as programs: process set-up, flag parsing and errors a
person reads.

A user's mistake (a bad config value or field, a missing or damaged file, a workdir in
use, a full disk, a diverged run) ends as one line, `error: ...`, and exit status 1;
the traceback only with --verbosity=1 or higher. A preempted run exits with
preemption.EXIT_CODE.
"""
from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import re
import sys
import warnings
from typing import Callable, Sequence

import ml_collections
from absl import app, flags, logging as absl_logging

from spadnet_jax import process_setup
from spadnet_jax.storage import locks

USER_ERRORS = (ValueError, OSError, FloatingPointError, locks.WorkdirInUse)


def _config_file(argv: Sequence[str], default: str | None) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _load_config(path: str) -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("_spadnet_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _unknown_override(argv: Sequence[str], path: str | None) -> str | None:
  """The message for the first --config.FIELD override naming no field of the config."""
  if not path:
    return None
  try:
    cfg = _load_config(path)
  except Exception:  # pylint: disable=broad-except  # the parser's own error says more
    return None
  from spadnet_jax import config_check  # pylint: disable=import-outside-toplevel  # train/eval only
  known = set(config_check.field_names(cfg))
  for arg in argv[1:]:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in known:
        return f"{config_check.unknown_field_message(cfg, name)} ({path})"
  return None


_FIELD_COMMENT = re.compile(r"^\s*c\.([\w.]+)\s*=[^#]*#\s*(.+?)\s*$")
HELP_FLAGS = ("-h", "--help", "--helpfull", "-?")


def field_comments(paths: Sequence[str]) -> dict[str, str]:
  """Each config field's one-line meaning: the comment on the line that sets `c.FIELD` in
  the config files (earlier files win)."""
  out: dict[str, str] = {}
  for path in paths:
    if os.path.isfile(path):
      with open(path) as f:
        for line in f:
          m = _FIELD_COMMENT.match(line)
          if m:
            out.setdefault(m.group(1), m.group(2))
  return out


def help_text(config_path: str | None) -> str:
  """What --help prints: the program's docstring, its flags and the distributed flags, and
  every config field with its default and meaning."""
  main = sys.modules.get("__main__")
  parts = [(main.__doc__ or "").strip(), "", "flags:", flags.FLAGS.main_module_help().strip()]
  if "distributed" in flags.FLAGS:
    parts += ["", "multi-process flags:", flags.FLAGS.module_help(process_setup.__name__).strip()]
  parts += ["", "--verbosity=1 shows tracebacks and the libraries' logs."]
  if config_path:
    from spadnet_jax import config_check  # pylint: disable=import-outside-toplevel  # train/eval only
    cfg = _load_config(config_path)
    default = os.path.join(os.path.dirname(os.path.abspath(config_path)), "default.py")
    meaning = field_comments([config_path, default])
    rows = []
    for name in config_check.field_names(cfg):
      value = config_check.get_field(cfg, name)
      if not hasattr(value, "items"):
        rows.append((f"{name} = {value!r}", meaning.get(name, "")))
    width = max(len(r[0]) for r in rows) + 2
    parts += ["", f"config fields ({config_path}; override with --config.FIELD=VALUE):"]
    parts += [f"  {left.ljust(width)}{right}".rstrip() for left, right in rows]
  return "\n".join(parts)


def flags_parser(default_config: str | None) -> Callable[[list[str]], list[str]]:
  """An absl flags parser that reports a bad flag or --config.FIELD override in one line,
  and answers --help with help_text (exit status 0)."""

  def parse(argv: list[str]) -> list[str]:
    if any(a in HELP_FLAGS for a in argv[1:]):
      print(help_text(_config_file(argv, default_config)))
      sys.exit(0)
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except  # config_flags raises many types
      message = _unknown_override(argv, _config_file(argv, default_config))
      if message is None:
        lines = str(e).strip().splitlines()
        message = lines[-1] if lines else type(e).__name__
      print(f"error: {message}", file=sys.stderr)
      sys.exit(2)

  return parse


def quiet_logging(verbose: bool = False, data_sets: bool = True) -> None:
  """Library log records (absl, Orbax, asyncio) and tfds progress bars are hidden unless
  `verbose` (--verbosity given): a person reads the program's own lines. A program that
  reads no data set (predict) passes data_sets=False and never imports tfds."""
  if verbose:
    return
  absl_logging.set_verbosity(absl_logging.FATAL)
  for name in ("asyncio", "jax", "orbax", "tensorflow_datasets"):
    std_logging.getLogger(name).setLevel(std_logging.CRITICAL)
  if data_sets:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.display_progress_bar(False)    # the builders print one line instead
  sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


def _without_closed_loop_noise(hook: Callable) -> Callable:
  """An unraisable-exception hook that drops "Event loop is closed": TensorStore's callbacks
  of a checkpoint write that failed (a full disk) reaching Orbax's finished event loop, one
  traceback per pending chunk, after the failure itself was reported."""

  def filtered(unraisable: "sys.UnraisableHookArgs") -> None:
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"):
      hook(unraisable)

  return filtered


def one_line_errors(run: Callable[[], int | None], verbose: bool,
                    more: tuple[type[BaseException], ...] = ()) -> int:
  """Run a program's work: a user error (USER_ERRORS, or `more`) prints one `error:` line
  and gives exit status 1; with `verbose` it is raised, traceback and all. The one error
  path of every program (absl ones through reporting_errors, argparse ones directly)."""
  try:
    return run() or 0
  except USER_ERRORS + more as e:
    if verbose:
      raise
    # Nothing after the one line: no log records, and no warnings from what the libraries
    # leave behind as the process ends (an Orbax write the error interrupted leaves a
    # coroutine that is never awaited; Python warns about it at exit).
    std_logging.disable(std_logging.CRITICAL)
    warnings.simplefilter("ignore")
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


def reporting_errors(main: Callable[[list[str]], int | None]) -> Callable[[list[str]], int]:
  """Wrap an absl main so that user errors print one line and exit 1."""

  def wrapped(argv: list[str]) -> int:
    return one_line_errors(lambda: main(argv), flags.FLAGS.verbosity >= 1)

  return wrapped


def run(main: Callable[[list[str]], int | None], default_config: str | None = None,
        preemptible: bool = False) -> None:
  """A program's whole `if __name__ == "__main__":` body: process set-up (before JAX
  starts), flags, jax.distributed where asked for, quiet logs, errors as one line.
  `preemptible` (train.py): a SIGTERM from here on is a stop request (preemption.EarlySignal)."""
  process_setup.prepare()
  if preemptible:
    from spadnet_jax import preemption  # pylint: disable=import-outside-toplevel  # imports JAX
    preemption.EarlySignal.install()

  def started(argv: list[str]) -> int | None:
    process_setup.initialize_distributed()
    quiet_logging(flags.FLAGS["verbosity"].present)
    return main(argv)

  app.run(reporting_errors(started), flags_parser=flags_parser(default_config))
