"""The package as a user installs it: a wheel built from the sources, in a virtualenv.

`build_wheel` builds it from a copy of pyproject.toml, README.md and infllava_jax/;
`make_venv` makes a virtualenv that sees this environment's dependencies but not its
infllava_jax (a .pth lists our site-packages; their own .pth files, an editable install's
finder among them, are not run), with the wheel installed or not. `session_wheel` builds the
wheel once per test session, for every test file that needs it.
"""

import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(argv, cwd, env, timeout=300) -> str:
  done = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert done.returncode == 0, f"{argv}:\n{done.stdout}\n{done.stderr}"
  return done.stdout


def build_wheel(work: pathlib.Path) -> pathlib.Path:
  """pip wheel from a copy of the sources, nothing written into the checkout; with the test
  extra's setuptools, so pip downloads no build environment."""
  src = work / "src"
  shutil.copytree(ROOT / "infllava_jax", src / "infllava_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src / name)
  run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
       "-w", work / "dist", src], cwd=work, env=os.environ)
  (wheel,) = (work / "dist").glob("infllava_jax-*.whl")
  return wheel


_built: dict[str, pathlib.Path] = {}


def session_wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel, built on the first call of the test session (pytest's tmp_path_factory)."""
  if "wheel" not in _built:
    _built["wheel"] = build_wheel(tmp_path_factory.mktemp("wheel"))
  return _built["wheel"]


def make_venv(work: pathlib.Path, wheel: pathlib.Path | None) -> pathlib.Path:
  """A virtualenv holding the wheel (None: not installed); this interpreter's site-packages
  folders on its path after its own, as plain folders (their .pth files are not processed)."""
  venv = work / "venv"
  run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, env=os.environ)
  python = venv / "bin" / "python"
  purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=work, env=os.environ).strip()
  ours = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
  pathlib.Path(purelib, "outer_site_packages.pth").write_text("\n".join(ours) + "\n")
  if wheel is not None:
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel], cwd=work, env=os.environ)
  return venv
