"""README.md's Python snippets run as written, as a script from another directory (the
package installed, not the repository on the path)."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

SKIP_MARK = "# needs "     # a first line saying what a snippet needs that the tests lack


def snippets() -> list[str]:
  text = (REPO / "README.md").read_text()
  return re.findall(r"^```python\n(.*?)^```", text, re.M | re.S)


@pytest.mark.slow
def test_readme_snippets_run_from_another_directory(tmp_path):
  blocks = snippets()
  runnable = [b for b in blocks if not b.startswith(SKIP_MARK)]
  # Two need what these tests lack here: the official weights, and an export folder with a
  # face PNG (that one runs in tests/test_export.py).
  assert len(blocks) >= 5 and len(runnable) == len(blocks) - 2, [b.splitlines()[0] for b in blocks]
  script = tmp_path / "readme_snippets.py"
  script.write_text("\n".join(
      ["import sys"] +
      [f"exec(compile({b!r}, 'README.md snippet {i}', 'exec'), {{}})\nprint('snippet {i} ran')"
       for i, b in enumerate(runnable)]))
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env={**env, "JAX_PLATFORMS": "cpu"},
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count(" ran") == len(runnable), r.stdout
