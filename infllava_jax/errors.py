"""The error of input a user can fix: `infllava` prints its message as one line on stderr and
exits with status 2 (`infllava_jax/cli.py`). Every subpackage may raise it; it imports
nothing of the package, so it adds no import edge."""


class ConfigError(ValueError):
  """Input that cannot be used as given: a config (an unknown preset or argument, an override
  of an unknown field or of the wrong type, a value the code using it rejects), a data file,
  a checkpoint step or a workdir that another run owns."""
