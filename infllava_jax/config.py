"""Loading `configs/*.py` files: `path.py[:arg]` plus `--config.a.b=value` overrides.

ml_collections' `config_flags` does the parsing (types checked against the config's own
fields); this module only gives it a private flag registry so library code and tests can
load configs without touching absl's global flags.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `configs/x.py[:arg]` and applies overrides such as `--config.model.dtype=float32`.

  Config files import their siblings as `configs.<name>`, so the folder holding `configs/`
  is put on `sys.path` first.
  """
  path = spec.split(":", 1)[0]
  if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO_ROOT, path)):
    spec = os.path.join(REPO_ROOT, spec)
    path = os.path.join(REPO_ROOT, path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  argv = ["infllava", f"--config={spec}", *overrides]
  registry = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default=spec, flag_values=registry,
                                  lock_config=False, sys_argv=argv)
  registry(argv)
  return registry.config
