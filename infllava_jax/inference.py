"""The Python API: ask a model questions about images.

    assistant = Assistant.from_run("runs/synthetic")          # or Assistant(config, params)
    assistant.ask("cat.png", "What is in the picture?")       # -> "A cat."
    assistant.ask_batch([img1, img2], ["Q1?", "Q2?"])          # one batched generation

Prompts use the llama3 template with its generation prompt (spec 9.3); images go through
the same preprocessing as training (`data.images.preprocess`, `data.image_aspect`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from infllava_jax import generate
from infllava_jax.convert import checkpoint_io
from infllava_jax.data import images, templates
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.model import infllava
from infllava_jax.training import checkpoint


def prompt_ids(question: str, tokenizer, model_cfg: ConfigDict, has_image: bool = True,
               history: Sequence[tuple[str, str]] = (), double_bos: bool = True) -> list[int]:
  """Token ids of a llama3 generation prompt: earlier (question, answer) turns, then `question`.

  The image (if any) belongs to the first question, as in training.
  """
  turns, first = [], True
  for q, a in [*history, (question, None)]:
    text = f"{templates.IMAGE}\n{q}" if (first and has_image) else q
    turns += [("human", text), ("gpt", a)]
    first = False
  text, _ = templates.render_llama3(turns)
  ids, _ = templates.tokenize(text, [], tokenizer, model_cfg.image_token_id, double_bos)
  ids, _ = templates.expand_image_slots(ids, ids, model_cfg.image_token_id,
                                        infllava.num_image_tokens(model_cfg))
  return ids.tolist()


def checkpoint_config(path: str, step: int | None = None) -> ConfigDict:
  """The config stored with a checkpoint: a run's whole config, or a converted one's model."""
  if checkpoint_io.is_converted(path):
    return ConfigDict({"model": checkpoint_io.read_model_config(path)})
  return checkpoint.read_config(path, step)


class Assistant:
  """A model, its params and tokenizer, ready to answer questions about images."""

  def __init__(self, config: ConfigDict, params: Any, tokenizer=None):
    self.config = config
    self.model = infllava.build_model(config.model)
    self.params = params
    data = config.get("data", ConfigDict())
    self.tokenizer = tokenizer or load_tokenizer(data.get("tokenizer_path"))
    self.aspect = data.get("image_aspect", "pad")
    self.double_bos = data.get("double_bos", True)
    stops = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    self.stop_ids = tuple(i for i in stops if i is not None and i >= 0)

  @classmethod
  def from_run(cls, path: str, step: int | None = None) -> "Assistant":
    """From a training run folder (latest step) or a converted checkpoint folder."""
    path = checkpoint.run_checkpoints(path)
    config = checkpoint_config(path, step)
    model = infllava.build_model(config.model)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                 *infllava.dummy_inputs(config.model)))
    params = checkpoint.restore_params_only(path, nn.meta.unbox(abstract["params"]), step=step)
    return cls(config, params)

  def pixels(self, image) -> np.ndarray:
    return images.preprocess(image, self.config.model.dcm.image_size, self.aspect)

  def ask_batch(self, image_list: Sequence[Any], questions: Sequence[str],
                sampling: generate.Sampling | None = None, seed: int = 0,
                on_token=None) -> list[str]:
    """One answer per (image, question) pair, generated as one left-padded batch."""
    if len(image_list) != len(questions):
      raise ValueError(f"ask_batch: {len(image_list)} images but {len(questions)} questions")
    sampling = sampling or generate.Sampling(max_new_tokens=32)
    sampling = generate.Sampling(**{**sampling.__dict__,
                                    "stop_ids": sampling.stop_ids or self.stop_ids})
    prompts = [prompt_ids(q, self.tokenizer, self.config.model, double_bos=self.double_bos)
               for q in questions]
    tokens, mask = generate.left_pad(prompts, self.tokenizer.pad_token_id)
    pixels = np.stack([self.pixels(im) for im in image_list])[:, None]
    run = generate.compiled_generate(self.model, sampling, self.tokenizer.pad_token_id, on_token)
    out, lengths = run(self.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(pixels),
                       jax.random.key(seed))
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [self.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
            for row, n in zip(out, lengths)]

  def ask(self, image, question: str, **kwargs) -> str:
    return self.ask_batch([image], [question], **kwargs)[0]
