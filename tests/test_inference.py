"""The main job's second half: a finished run answers a question through the CLI; questions
the model cannot take are refused before anything runs."""

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from infllava_jax.presets import _sections
from infllava_jax import generate, generate_cli, inference
from infllava_jax.config import load_config
from infllava_jax.data import synthetic
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.inference import Assistant
from infllava_jax.model import infllava
from infllava_jax.checkpoints import locate, run as checkpoint_run
from infllava_jax.training import loop
from tests.random_params import random_params


def test_run_folder_answers_through_api_and_cli(tmp_path, capsys, monkeypatch):
  config = load_config("configs/synthetic.py", [
      "--config.train.steps=2", "--config.data.batch_size=2",
      "--config.data.synthetic.num_train=8", "--config.eval.heldout_examples=0"])
  monkeypatch.chdir(tmp_path)
  run = "runs/synthetic"  # relative, as in the README's main command
  trainer = loop.Trainer(config, run, devices=jax.devices()[:1])
  trainer.run()
  record = next(synthetic.synthetic_examples("heldout", 1, image_size=252))
  image = tmp_path / "q.png"
  Image.fromarray(record["image"]).save(image)
  question = record["conversations"][0]["value"].replace("<image>", "").strip()

  assistant = Assistant.from_run(run)
  np.testing.assert_array_equal(  # the restored params are the trained ones
      assistant.params["projector"]["fc1"]["kernel"],
      np.asarray(trainer.state.params["projector"]["fc1"]["kernel"]))
  # On one device, not copied onto each of the 8 (a multi-GPU host's every GPU).
  assert {d for x in jax.tree.leaves(assistant.params) for d in x.devices()} == {
      jax.devices()[0]}
  answer = assistant.ask(str(image), question)
  assert isinstance(answer, str)

  assert generate_cli.main(["--checkpoint", run, "--image", str(image),
                            "--prompt", question, "--max-new-tokens", "4"]) == 0
  out = capsys.readouterr().out
  assert f"Q: {question}" in out and f"A: {answer}" in out

  # --tokenizer: a folder that is not the model's tokenizer is refused, naming both sizes.
  from tokenizers import Tokenizer, models, trainers
  from transformers import PreTrainedTokenizerFast
  raw = Tokenizer(models.BPE())
  raw.train_from_iterator(["hello world"], trainers.BpeTrainer(vocab_size=300,
                                                               show_progress=False))
  PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "other")
  flags = ["--checkpoint", run, "--image", str(image), "--prompt", question]
  assert generate_cli.main(flags + ["--tokenizer", str(tmp_path / "other")]) == 2
  err = capsys.readouterr().err
  assert f"has {raw.get_vocab_size() + 1} entries and the model's vocabulary 512 rows" in err
  with pytest.raises(SystemExit):
    generate_cli.main(flags + ["--tokenizer", str(tmp_path / "missing")])
  assert "--tokenizer" in capsys.readouterr().err


def test_image_marker_in_text_and_prompts_past_the_context_are_refused(tiny_config):
  assistant = Assistant(tiny_config, random_params(tiny_config.model))
  with pytest.raises(ValueError, match="the question holds '<image>', the image marker"):
    assistant.prompt("what is <image>?")
  with pytest.raises(ValueError, match="history turn 0's answer holds '<image>'"):
    assistant.prompt("and now?", history=[("what is it?", "it is <image>")])
  assert assistant.prompt("what is <image", has_image=False)  # only the whole marker counts

  question = "what is it?"
  room = assistant.context_length - len(assistant.prompt(question))
  with pytest.raises(ValueError, match=f"max_new_tokens is {room + 1}: together over the "
                                       f"model's {assistant.context_length} positions"):
    assistant.ask(np.zeros((8, 8, 3), np.uint8), question,
                  sampling=generate.Sampling(max_new_tokens=room + 1))
  with pytest.raises(ValueError, match="row 1's prompt has"):
    assistant.ask_batch([None, None], ["hi", "hi " * room],
                        sampling=generate.Sampling(max_new_tokens=1))


def test_a_tokenizer_that_is_not_the_models_is_refused(tiny_config):
  """The package's 512-entry tokenizer on LLaMA-3's vocabulary would encode the prompt with
  the wrong ids, never meet a stop id and decode every answer to nothing: refused, before
  the params are touched. A table padded a little past the tokenizer is fine."""
  config = tiny_config.copy_and_resolve_references()
  config.model.llm.vocab_size = 128257
  with pytest.raises(ValueError, match=r"has 512 entries and the model's vocabulary 128,257 "
                                       r"rows: it is not the model's tokenizer"):
    Assistant(config, params=None)
  config.model.llm.vocab_size = 511  # the pad id would index past the table
  with pytest.raises(ValueError, match="has 512 entries and the model's vocabulary 511 rows"):
    Assistant(config, params=None)
  inference.check_tokenizer(load_tokenizer(), 512 + inference.VOCAB_PADDING - 1)


def test_a_runs_float32_llm_loads_in_the_compute_dtype_and_answers_the_same(tiny_config,
                                                                           tmp_path):
  """A run keeps float32 master weights; inference computes in bfloat16 with every LLM param
  cast first, so loading them as bfloat16 halves their memory and changes no logit."""
  model_cfg = tiny_config.model.copy_and_resolve_references()
  model_cfg.dtype = "bfloat16"  # llm.param_dtype stays float32
  params = random_params(model_cfg)
  with checkpoint_run.Checkpointer(tmp_path / "run" / locate.RUN_CHECKPOINTS,
                                  _sections.checkpoint_config(),
                                  config=ConfigDict({"model": model_cfg})) as steps:
    steps.save(3, params, {"count": np.zeros((), np.int32)}, force=True)
  config, loaded, step = inference.load_checkpoint(str(tmp_path / "run"))
  assert step == 3
  assert config.model.llm.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(loaded["llm"])} == {np.dtype("bfloat16")}
  assert {x.dtype for x in jax.tree.leaves(loaded["projector"])} == {np.dtype("float32")}
  tokens = np.arange(1, 12, dtype=np.int32)[None]
  logits = {}
  for name, cfg, p in (("stored", model_cfg, params), ("loaded", config.model, loaded)):
    model = infllava.build_model(cfg)
    logits[name], _ = jax.jit(model.apply)({"params": p}, tokens)
  np.testing.assert_array_equal(logits["loaded"], logits["stored"])
