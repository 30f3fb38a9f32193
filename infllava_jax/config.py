"""Loading `configs/*.py` files: `path.py[:arg]` plus `--config.a.b=value` overrides.

ml_collections' `config_flags` does the parsing (types checked against the config's own
fields); this module only gives it a private flag registry so library code and tests can
load configs without touching absl's global flags.
"""

from __future__ import annotations

import ast
import os
import sys
from typing import Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
  """Overrides a config cannot take: an unknown field, or a value of the wrong type."""


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads `configs/x.py[:arg]` and applies overrides such as `--config.model.dtype=float32`.

  Raises FileNotFoundError for a missing file and ConfigError for overrides it cannot take.

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
  try:
    registry(argv)
    return registry.config
  except (flags.Error, AttributeError, KeyError) as e:  # what config_flags raises for them
    what = "unknown field " if isinstance(e, (AttributeError, KeyError)) else ""
    raise ConfigError(f"{spec} with {' '.join(overrides) or 'no overrides'}: "
                      f"{what}{_unquoted(str(e))}") from None


def _unquoted(message: str) -> str:
  """ml_collections' unknown-field message arrives quoted twice ('\\'x\\'\\nDid you...')."""
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      break
  return message.replace("\n", ". ")
