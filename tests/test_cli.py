"""The `infllava` entry point: usage, unknown commands, and the process settings it makes."""

import os

import pytest

from infllava_jax import cli


def test_help_lists_every_command(capsys):
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {name} " in out for name in cli.COMMANDS)


def test_help_for_a_command_and_the_version(capsys):
  with pytest.raises(SystemExit) as done:
    cli.main(["help", "generate"])
  assert done.value.code == 0 and "usage: infllava generate" in capsys.readouterr().out
  assert cli.main(["--version"]) == 0
  assert capsys.readouterr().out.startswith("infllava-jax ")


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


@pytest.mark.parametrize("argv, words", [
    (["train", "--config", "nope.py", "--workdir", "w"], "config file 'nope.py' not found"),
    (["train", "--config", "configs/synthetic.py", "--workdir", "w",
      "--config.train.stepz=3"], "unknown field 'stepz'. Did you mean \"steps\""),
    (["demo", "--config.model.llm.depth=two"], "invalid literal for int()"),
    (["generate", "--checkpoint", "{empty}", "--image", "{image}", "--prompt", "hi"],
     "is not a checkpoint: no params/ folder and no complete step"),
])
def test_user_mistakes_get_one_line_and_exit_2(argv, words, tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  (tmp_path / "x.png").write_bytes(b"")  # only its existence is checked before the checkpoint
  argv = [a.format(empty=tmp_path / "empty", image=tmp_path / "x.png") for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"infllava {argv[0]}: error: "), err
  assert words in err[0]
