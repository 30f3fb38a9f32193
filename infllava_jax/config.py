"""Loading configs: a preset `NAME[:arg]` or a file `PATH.py[:arg]`, plus `--config.a.b=value`.

Presets are the package's own configs (infllava_jax/presets/NAME.py), so an installed
package runs without a checkout: `infllava train --config synthetic:llava ...`. A file is
any Python file with a `get_config(arg)`, such as the checkout's `configs/*.py` (which
return the presets) or a user's own.

ml_collections' `config_flags` does the parsing (types checked against the config's own
fields); this module only gives it a private flag registry so library code and tests can
load configs without touching absl's global flags.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
from typing import Sequence

from absl import flags
from ml_collections import ConfigDict, config_flags

from infllava_jax import presets
from infllava_jax.errors import ConfigError


def preset_names() -> list[str]:
  """The presets `load_config` takes by name: the modules of infllava_jax/presets/ (those
  whose names start with `_` hold shared sections, not presets)."""
  return sorted(m.name for m in pkgutil.iter_modules(presets.__path__)
                if not m.name.startswith("_"))


def config_help(example: str) -> str:
  """The `--config` help of the commands that take one."""
  return (f"a preset NAME[:arg] ({', '.join(preset_names())}) or a config file "
          f"PATH.py[:arg], e.g. {example}")


def is_config_file(spec: str) -> bool:
  """`PATH.py[:arg]` names a file; anything else a preset."""
  return spec.split(":", 1)[0].endswith(".py")


def parse_args_and_overrides(parser, argv: Sequence[str],
                             example: str = "--config.train.lr=1e-4") -> tuple[object, list[str]]:
  """`parser`'s arguments and the `--config.a.b=value` overrides that follow them; any other
  unknown argument exits through `parser.error`, naming `example` as the override form."""
  args, overrides = parser.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    parser.error(f"unrecognised arguments: {' '.join(bad)} (config overrides look like "
                 f"{example})")
  return args, overrides


def load_config(spec: str, overrides: Sequence[str] = ()) -> ConfigDict:
  """Loads a preset `NAME[:arg]` or a file `PATH.py[:arg]` and applies overrides such as
  `--config.model.dtype=float32`.

  Raises FileNotFoundError for a missing file and ConfigError for an unknown preset or
  overrides the config cannot take.
  """
  registry = flags.FlagValues()
  if is_config_file(spec):
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      raise FileNotFoundError(f"config file {path!r} not found{_preset_hint(path)}")
    config, argv = spec, ["infllava", f"--config={spec}", *overrides]
  else:  # the config itself is the flag's default: argv holds only the overrides
    config, argv = preset(spec), ["infllava", *overrides]
  try:  # config_flags defines the overrides' flags, checking their fields, as it is called
    if isinstance(config, str):
      config_flags.DEFINE_config_file("config", default=config, flag_values=registry,
                                      lock_config=False, sys_argv=argv)
    else:
      config_flags.DEFINE_config_dict("config", config, flag_values=registry,
                                      lock_config=False, sys_argv=argv)
    registry(argv)
    return registry.config
  except (flags.Error, AttributeError, KeyError) as e:  # what config_flags raises for them
    what = "unknown field " if isinstance(e, (AttributeError, KeyError)) else ""
    raise ConfigError(f"{spec} with {' '.join(overrides) or 'no overrides'}: "
                      f"{what}{_message(str(e))}") from None


def preset(spec: str) -> ConfigDict:
  """The preset `NAME[:arg]`: `infllava_jax.presets.NAME.get_config(arg)`."""
  name, *arg = spec.split(":", 1)
  if name not in preset_names():
    raise ConfigError(f"config {spec!r}: no preset {name!r} (presets: "
                      f"{', '.join(preset_names())}); a config file's name ends in .py")
  try:
    return importlib.import_module(f"{presets.__name__}.{name}").get_config(*arg)
  except ConfigError as e:  # an argument it does not take
    raise ConfigError(f"config {spec!r}: {e}") from None


def _preset_hint(path: str) -> str:
  """For `configs/synthetic.py` outside a checkout: the preset of that name."""
  name = os.path.splitext(os.path.basename(path))[0]
  return f" (the package's preset of that name: --config {name})" if (
      name in preset_names()) else ""


def _message(message: str) -> str:
  """One line of what config_flags reports.

  An unknown field's name arrives quoted twice ('\\'x\\'\\nDid you...'); an error raised
  by a config file's `get_config` as a traceback, whose last line says what went wrong.
  """
  if "Traceback (most recent call last)" in message:
    message = message.strip().splitlines()[-1].removeprefix(
        f"{ConfigError.__module__}.{ConfigError.__name__}: ")
  while len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
    try:
      message = ast.literal_eval(message)
    except (ValueError, SyntaxError):
      break
  return message.replace("\n", ". ")
