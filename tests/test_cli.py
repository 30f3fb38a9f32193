"""The `infllava` entry point: usage, unknown commands, and the process settings it makes."""

import os

import pytest

from infllava_jax import cli
from tests.run_cli import error_line, infllava


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
  from PIL import Image
  Image.new("RGB", (8, 8)).save(tmp_path / "x.png")  # read before the checkpoint is
  argv = [a.format(empty=tmp_path / "empty", image=tmp_path / "x.png") for a in argv]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"infllava {argv[0]}: error: "), err
  assert words in err[0]


# ---- as a user runs them: `python -m infllava_jax.cli ...` in a subprocess ----

def test_bad_flags_are_refused_before_a_model_loads(tmp_path):
  (tmp_path / "bad.png").write_bytes(b"not an image")
  (tmp_path / "empty").mkdir()
  done = infllava("serve", "--checkpoint", tmp_path / "empty", "--port", "99999")
  assert error_line(done, "serve").endswith(
      "argument --port: expected a TCP port 1-65535, got '99999'")
  done = infllava("generate", "--checkpoint", tmp_path / "empty", "--image",
                  tmp_path / "bad.png", "--prompt", "What is it?")
  assert error_line(done, "generate").startswith(
      f"infllava generate: error: --image: cannot decode image '{tmp_path / 'bad.png'}'")
  out = tmp_path / "eval"
  out.mkdir()
  (out / "predictions.jsonl").write_text("{}\n")  # an earlier run's
  done = infllava("evaluate", "--checkpoint", tmp_path / "empty", "--benchmark", "synthetic",
                  "--out", out)
  assert error_line(done, "evaluate") == (
      f"infllava evaluate: error: --out '{out}' already holds predictions.jsonl from an "
      "earlier run; give another --out, or --overwrite to replace them")
  assert (out / "predictions.jsonl").read_text() == "{}\n"


def test_an_over_long_prompt_is_one_line_that_does_not_echo_it(tiny_checkpoint, tmp_path):
  from PIL import Image
  Image.new("RGB", (40, 30)).save(tmp_path / "x.png")
  prompt = "word " * 3000  # ~3000 tokens, over the tiny model's 2048 positions
  done = infllava("generate", "--checkpoint", tiny_checkpoint, "--image", tmp_path / "x.png",
                  "--prompt", prompt, "--dtype", "bfloat16")
  line = error_line(done, "generate")
  assert " tokens and max_new_tokens is 64: together over the model's 2048 positions" in line
  assert done.stdout == "" and "word word" not in done.stderr
  assert len(done.stderr.splitlines()) == 2, done.stderr  # the load line, then the error
  assert done.stderr.startswith(f"loaded {tiny_checkpoint} (infllava, bfloat16) in ")


def test_verbose_adds_the_traceback(capsys, monkeypatch):
  done = infllava("train", "--config", "nope.py", "--workdir", "w", "--verbose")
  assert done.returncode == 2
  assert done.stderr.startswith("Traceback (most recent call last):")
  assert done.stderr.splitlines()[-1] == (
      "infllava train: error: config file 'nope.py' not found")
  monkeypatch.setenv("INFLLAVA_VERBOSE", "1")
  assert cli.main(["train", "--config", "nope.py", "--workdir", "w"]) == 2
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv("INFLLAVA_VERBOSE", "0")
  assert cli.main(["train", "--config", "nope.py", "--workdir", "w"]) == 2
  assert len(capsys.readouterr().err.splitlines()) == 1
