"""Running the `infllava` command as a user does: `python -m infllava_jax.cli ...` in a
subprocess, with this checkout's package."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def infllava(*argv, env=None) -> subprocess.CompletedProcess:
  """`python -m infllava_jax.cli ARGV` with this checkout's package."""
  return subprocess.run([sys.executable, "-m", "infllava_jax.cli", *map(str, argv)],
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def error_line(done: subprocess.CompletedProcess, command: str) -> str:
  """The one error line of a refused run, after checking exit 2 and no traceback."""
  assert done.returncode == 2, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  lines = [line for line in done.stderr.splitlines()
           if line.startswith(f"infllava {command}: error: ")]
  assert len(lines) == 1, done.stderr
  return lines[0]
