"""The `infllava` entry point: usage, unknown commands, and the process settings it makes."""

import os

import pytest

from infllava_jax import cli


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_an_unknown_command_is_named_and_exits_2(capsys):
  assert cli.main(["trian"]) == 2
  assert "unknown command 'trian'" in capsys.readouterr().err


def test_transformers_advice_is_off_unless_the_user_set_it(monkeypatch):
  # Without torch, importing transformers advises "PyTorch was not found. Models won't be
  # available": noise in our commands, which use its tokenizers only (checked by hand in a
  # venv without torch: the line is gone from `infllava generate --help`).
  monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
  with pytest.raises(SystemExit):  # argparse's --help exit
    cli.main(["data", "--help"])
  assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"
  monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "")
  with pytest.raises(SystemExit):
    cli.main(["data", "--help"])
  assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == ""
