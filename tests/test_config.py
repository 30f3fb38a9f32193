"""Configs: the package's presets by name, the checkout's configs/*.py files, overrides."""

import os

import pytest
from ml_collections import ConfigDict

from infllava_jax import cli
from infllava_jax.config import ConfigError, load_config, preset_names
from infllava_jax.convert import sources
from infllava_jax.evaluate import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every `configs/NAME.py:arg` the project documents or tests (None: no `:arg`).
ARGS = {"infllava_8b": [None, "infllava", "llava", "llava_next", "s2"],
        "tiny": [None, "infllava", "llava", "llava_next", "s2"],
        "synthetic": [None, "infllava", "baseline", "llava", "anyres", "llava_next", "s2"],
        "infllava_8b_stage1": [None], "infllava_8b_stage2": [None, "s2"],
        "infllava_8b_stage2_lora": [None],
        "llava_next_8b": [None, "model"], "s2_8b": [None]}


def test_every_config_file_is_a_preset():
  files = {f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
           if f.endswith(".py") and f != "__init__.py"}
  assert files == set(preset_names()) == set(ARGS)


@pytest.mark.parametrize("name, arg", [(n, a) for n, args in ARGS.items() for a in args])
def test_config_files_equal_the_presets(name, arg):
  suffix = "" if arg is None else f":{arg}"
  from_file = load_config(os.path.join(REPO, "configs", f"{name}.py{suffix}"))
  from_preset = load_config(f"{name}{suffix}")
  assert from_file.to_dict() == from_preset.to_dict() and from_file == from_preset


def test_a_preset_takes_overrides_outside_a_checkout(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: presets come from the package
  config = load_config("synthetic:baseline", ["--config.train.steps=3",
                                              "--config.model.dtype=bfloat16"])
  assert (config.train.steps, config.model.dtype, config.model.variant) == (3, "bfloat16",
                                                                             "llava")
  assert load_config("synthetic").train.steps == 800  # a fresh copy each time
  # What the library loads itself: the converter's default model, evaluate's synthetic set.
  assert sources.base_config(None, "llava") == load_config("infllava_8b:llava").model
  assert synthetic.synthetic_config(ConfigDict()) == load_config("synthetic").data.synthetic
  with pytest.raises(FileNotFoundError,
                     match=r"'configs/synthetic.py' not found \(the package's preset of that "
                           r"name: --config synthetic\)"):
    load_config("configs/synthetic.py")


@pytest.mark.parametrize("spec, overrides, words", [
    ("synthetic:foo", [], "config 'synthetic:foo': unknown variant 'foo'; expected 'infllava', "
                          "'llava', 'llava_next' or 's2'"),
    ("configs/tiny.py:foo", [], "configs/tiny.py:foo with no overrides: unknown variant 'foo'"),
    ("synthetc", [], "config 'synthetc': no preset 'synthetc' (presets: infllava_8b, "
                     "infllava_8b_stage1, infllava_8b_stage2, infllava_8b_stage2_lora, "
                     "llava_next_8b, s2_8b, synthetic, tiny)"),
    ("tiny", ["--config.model.foo=1"], "tiny with --config.model.foo=1: unknown field foo"),
    ("synthetic", ["--config.train.stepz=1"], "unknown field 'stepz'. Did you mean \"steps\""),
    ("tiny", ["--config.model.llm.depth=two"], "invalid literal for int()"),
])
def test_config_mistakes_are_one_line_config_errors(spec, overrides, words):
  with pytest.raises(ConfigError) as error:
    load_config(spec, overrides)
  assert words in str(error.value) and "\n" not in str(error.value)


def test_train_names_the_presets_in_its_help_and_takes_one(capsys):
  with pytest.raises(SystemExit):
    cli.main(["train", "--help"])
  printed = " ".join(capsys.readouterr().out.split())
  assert "preset NAME[:arg] (infllava_8b, infllava_8b_stage1, infllava_8b_stage2, " \
         "infllava_8b_stage2_lora, llava_next_8b, s2_8b, synthetic, tiny) or a config file " \
         "PATH.py[:arg]" in printed
  assert cli.main(["train", "--config", "synthetic:foo", "--workdir", "w"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["infllava train: error: config 'synthetic:foo': unknown variant 'foo'; "
                 "expected 'infllava', 'llava', 'llava_next' or 's2'"]
