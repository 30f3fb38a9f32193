"""The Python API: ask a model questions about images.

    assistant = Assistant.from_run("runs/synthetic")          # or Assistant(config, params)
    assistant.ask("cat.png", "What is in the picture?")       # -> "A cat."
    assistant.ask_batch([img1, img2], ["Q1?", "Q2?"])          # one batched generation
    assistant.ask("cat.png", "And its colour?", history=[("What is in the picture?", "A cat.")])
    assistant.stream("cat.png", "Describe it.", on_text=print)  # text pieces as tokens arrive

Prompts use the llama3 template with its generation prompt (docs/fidelity.md#llama3-template); images go through
the same preprocessing as training (`data.images.preprocess`, `data.image_aspect`). An image
of None asks a text-only question (no image slots in the prompt).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from infllava_jax import generate
from infllava_jax import quantize as quantization
from infllava_jax.checkpoints import converted, locate, params as checkpoint_params
from infllava_jax.data import anyres as anyres_data
from infllava_jax.data import images, templates
from infllava_jax.data.tokenizer import load_tokenizer
from infllava_jax.errors import ConfigError
from infllava_jax.lora import params as lora_params, provider as lora
from infllava_jax.model import anyres, infllava


def prompt_ids(question: str, tokenizer, model_cfg: ConfigDict, has_image: bool = True,
               history: Sequence[tuple[str, str]] = (), double_bos: bool = True,
               image_tokens: int | None = None) -> list[int]:
  """Token ids of a llama3 generation prompt: earlier (question, answer) turns, then `question`.

  The image (if any) belongs to the first question, as in training, with `image_tokens`
  slots (None: `infllava.num_image_tokens`; an AnyRes image's own count is
  `model.anyres.num_image_tokens`). Raises ValueError when
  a question or answer holds the image marker '<image>': the image's slots come from
  `has_image`, and a marker in the text would add a second block of them.
  """
  for i, (q, a) in enumerate([*history, (question, None)]):
    for role, text in (("question", q), ("answer", a)):
      if text is not None and templates.IMAGE in text:
        where = "the question" if i == len(history) else f"history turn {i}'s {role}"
        raise ValueError(f"{where} holds {templates.IMAGE!r}, the image marker; the image is "
                         f"passed on its own and its slots are added to the prompt")
  turns, first = [], True
  for q, a in [*history, (question, None)]:
    text = f"{templates.IMAGE}\n{q}" if (first and has_image) else q
    turns += [("human", text), ("gpt", a)]
    first = False
  text, _ = templates.render_llama3(turns)
  ids, _ = templates.tokenize(text, [], tokenizer, model_cfg.image_token_id, double_bos)
  if has_image and image_tokens is None:
    image_tokens = infllava.num_image_tokens(model_cfg)
  ids, _ = templates.expand_image_slots(ids, ids, model_cfg.image_token_id, image_tokens or 0)
  return ids.tolist()


# How far a model's vocabulary may outnumber its tokenizer's entries: tables are padded to
# multiples of 64 or 128 rows at most (llava-hf's LLaMA-3: 128,320 rows for 128,258 entries).
VOCAB_PADDING = 128


def check_tokenizer(tokenizer, vocab_size: int) -> None:
  """Raises ValueError when `tokenizer` cannot be the model's: more entries than embedding
  rows (its ids would index past the table), or a vocabulary padded far past its entries
  (such as the package's 512-entry tokenizer on LLaMA-3's 128,257 rows, which would encode
  the prompt wrongly, never stop, and decode every answer to nothing)."""
  entries = len(tokenizer)
  if entries > vocab_size or vocab_size - entries >= VOCAB_PADDING:
    raise ValueError(
        f"the tokenizer at {tokenizer.name_or_path} has {entries:,} entries and the model's "
        f"vocabulary {vocab_size:,} rows: it is not the model's tokenizer. Give the model's "
        "Hugging Face tokenizer folder (--tokenizer DIR, or the run's data.tokenizer_path; "
        "`infllava convert from-pytorch` copies the source's into the converted checkpoint)")


class Loaded(NamedTuple):
  """What `load_checkpoint` read."""
  config: ConfigDict
  params: Any
  step: int | None   # the run's step read; None for a converted checkpoint


def load_checkpoint(path: str, step: int | None = None, dtype: str | None = None) -> Loaded:
  """(config, params, step) for inference from a training run folder (`step`, or its
  newest step that reads: a damaged newer one is reported in one line and skipped), one
  step folder, or a converted checkpoint folder (a quantised one, from `quantize.save`,
  comes quantised); on one device (the first), in the dtypes the config's model builds,
  except that the LLM's params come in the compute dtype (`model.dtype`, or `dtype` in its
  place) where that is narrower than their stored one (the config returned says so).

  The LLM casts every param to the compute dtype before using it (products, norms, the
  embedding lookup), so narrowing them on load changes no answer, bit for bit; a training
  run's float32 master weights (8B: 30.6 GB) then take half the memory, and decoding reads
  half the bytes per token.
  """
  def read(folder) -> tuple[ConfigDict, Any]:
    config = locate.folder_config(folder)
    if dtype:
      config.model.dtype = dtype
    if quantization.is_saved(folder):
      return config, quantization.load(folder)[1]
    llm = config.model.llm
    if jnp.dtype(config.model.dtype).itemsize < jnp.dtype(llm.param_dtype).itemsize:
      llm.param_dtype = config.model.dtype
    lora_cfg = config.get("train", ConfigDict()).get("lora")
    if lora_cfg is not None and lora_cfg.get("enabled") and lora_cfg.get("base_bits"):
      raise ConfigError(f"{folder}: a QLoRA run (train.lora.base_bits={lora_cfg.base_bits}) "
                        "holds its base quantised for training, and generation does not "
                        "read that layout yet: train LoRA on a float base to generate")
    model = infllava.build_model(config.model)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                 *infllava.dummy_inputs(config.model)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = checkpoint_params.abstract_tree(nn.meta.unbox(abstract["params"]), device)
    return config, merge_saved_lora(folder, config,
                                    checkpoint_params.restore_folder(folder, target))

  step, (config, params) = locate.read_checkpoint(path, step, read)
  return Loaded(config, params, step)


def merge_saved_lora(folder, config: ConfigDict, params):
  """`params` (the model's, without LoRA) with the LoRA factors saved beside them in
  `folder` (a LoRA run's step, or a `convert from-pytorch --keep-lora` checkpoint) merged
  into their kernels (`lora.params.merge`, rank and alpha from `lora.params.settings`);
  `params` unchanged when it holds none. Merged, a LoRA model decodes at the base model's
  speed and can be quantised like it."""
  directory = folder / converted.PARAMS_DIR
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # where `read` put the base
  factors = {path: jax.ShapeDtypeStruct(meta.shape, jnp.float32, sharding=device)
             for path, meta in checkpoint_params.saved_params(directory).items()
             if lora_params.is_lora(path)}
  if not factors:
    return params
  rank, alpha = lora_params.settings(folder, config)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  flat.update(checkpoint_params.read(directory, factors))
  return lora_params.merge(flax.traverse_util.unflatten_dict(flat, sep="/"), rank=rank,
                           alpha=alpha)


class ContextLengthError(ValueError):
  """Prompt + max_new_tokens over the model's positions."""


@dataclasses.dataclass(frozen=True)
class Answer:
  """One generated answer.

  text: the decoded answer, special tokens skipped, stripped (what `ask` returns).
  token_ids: the generated ids, up to and including the stop id when there is one.
  prompt_tokens: the prompt's length in tokens (image slots included).
  finish_reason: "stop" (a stop id ended it) or "length" (`max_new_tokens` ran out).
  """
  text: str
  token_ids: tuple[int, ...]
  prompt_tokens: int
  finish_reason: str


class TextStream:
  """Generated ids in, text pieces out, for printing an answer while it is generated.

  Byte-level BPE pieces need not be whole characters, and a character's bytes may span
  tokens, so ids are never decoded one at a time: the last few ids are decoded together
  and only text that no later id can change is passed on (vLLM's incremental detokenising:
  a trailing U+FFFD, an incomplete UTF-8 sequence, waits for its next byte). Leading and
  trailing whitespace is held back, so the pieces concatenate to exactly the stripped
  answer that `Assistant.ask` returns once `finish` has passed on the rest.
  """

  def __init__(self, tokenizer, stop_ids: Sequence[int], on_text: Callable[[str], None]):
    self.tokenizer = tokenizer
    self.stop_ids = frozenset(int(i) for i in stop_ids)
    self.on_text = on_text
    self.ids: list[int] = []
    self.raw = ""  # decoded text so far, unstripped
    self.sent = ""  # what on_text has been given: a prefix of the final answer
    self.stopped = False
    self._prefix, self._read = 0, 0  # ids[_prefix:_read] were decoded last time

  def _decode(self, ids) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def push(self, token: int) -> None:
    """The next generated id (ignored after a stop id)."""
    if self.stopped:
      return
    self.ids.append(int(token))
    if int(token) in self.stop_ids:
      self.stopped = True
      return
    before = self._decode(self.ids[self._prefix:self._read])
    after = self._decode(self.ids[self._prefix:])
    if len(after) <= len(before) or after.endswith("\ufffd"):
      return
    self.raw += after[len(before):]
    self._prefix, self._read = self._read, len(self.ids)
    self._send(self.raw.strip())

  def finish(self, text: str) -> None:
    """Passes on the rest of the final answer `text` (the authoritative decode)."""
    self._send(text)

  def _send(self, text: str) -> None:
    if text.startswith(self.sent) and len(text) > len(self.sent):
      piece, self.sent = text[len(self.sent):], text
      self.on_text(piece)


class _TokenRelay:
  """A fixed host callback for `generate.compiled_generate` (so its jit cache is reused)
  that hands each step's tokens to the current `TextStream`, in step order."""

  def __init__(self):
    self.stream: TextStream | None = None
    self._next, self._waiting = 0, {}

  def start(self, stream: TextStream | None) -> None:
    self.stream, self._next, self._waiting = stream, 0, {}

  def __call__(self, step, tokens) -> None:
    if self.stream is None:
      return
    self._waiting[int(step)] = int(np.asarray(tokens)[0])
    while self._next in self._waiting:  # unordered callbacks: release in step order
      self.stream.push(self._waiting.pop(self._next))
      self._next += 1


class Assistant:
  """A model, its params and tokenizer, ready to answer questions about images.

  `length_bucket` (default 64; 1: none) left-pads prompts to a multiple of it, so prompts of
  nearby lengths share one compiled generation (each new question would otherwise compile
  the whole model again); padding slots are masked, so answers are the same up to float
  rounding. `params` are
  held with the LLM's layers unrolled (`generate.for_decoding`); `Assistant(config,
  assistant.params)` accepts them back.
  """

  def __init__(self, config: ConfigDict, params: Any, tokenizer=None, length_bucket: int = 64,
               consume_params: bool = False, quantize: str | None = None):
    """consume_params: `params` are handed over, and each stacked layer array is deleted once
    unrolled, so loading peaks at the params plus one such array, not twice the LLM
    (`from_run` does this with the params it loads). quantize: "int8", "int4" or "nf4"
    runs the LLM's linear layers on weights quantised so (`infllava_jax.quantize`); None
    runs `params` as they are (quantised ones, from `quantize.load`, in their mode)."""
    if length_bucket < 1:
      raise ValueError(f"Assistant: length_bucket must be >= 1, got {length_bucket}")
    self.config = config
    self.length_bucket = length_bucket
    data = config.get("data", ConfigDict())
    self.tokenizer = tokenizer or load_tokenizer(data.get("tokenizer_path"))
    check_tokenizer(self.tokenizer, config.model.llm.vocab_size)
    # Host arrays go to the device once, not at every generation.
    params = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, params)
    # The LLM's layers unrolled for decoding (see `generate.for_decoding`).
    self.model, self.params = generate.for_decoding(infllava.build_model(config.model), params,
                                                    consume=consume_params)
    # A LoRA run's adapters, unmerged (`lora/provider.py`).
    self.model = lora.for_inference(self.model, config, self.params, quantize)
    self.model, self.params = quantization.quantize(self.model, self.params, quantize,
                                                    consume=consume_params)
    self.aspect = data.get("image_aspect", "pad")
    self.double_bos = data.get("double_bos", True)
    stops = [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>")]
    self.stop_ids = tuple(i for i in stops if i is not None and i >= 0)
    self.lock = threading.Lock()  # one generation at a time (see `stream`)
    self._relay = _TokenRelay()

  @classmethod
  def from_run(cls, path: str, step: int | None = None, dtype: str | None = None,
               **kwargs) -> "Assistant":
    """From a training run folder (latest step) or a converted checkpoint folder; `dtype`:
    the compute dtype, in place of the stored config's `model.dtype`.

    kwargs go to the constructor (`tokenizer`, `length_bucket`, `quantize`). A checkpoint
    written by `quantize.save` loads and runs quantised.
    """
    config, params, _ = load_checkpoint(path, step, dtype)
    return cls(config, params, consume_params=True, **kwargs)

  @property
  def context_length(self) -> int:
    """Positions the language model was built for (prompt + answer should fit)."""
    return int(self.config.model.llm.max_positions)

  def prompt(self, question: str, history: Sequence[tuple[str, str]] = (),
             has_image: bool = True, image=None) -> list[int]:
    """The prompt ids `ask` uses for this question, history and image presence (a
    llava_next model's slots depend on the image's size: give the `image` itself)."""
    return prompt_ids(question, self.tokenizer, self.config.model, has_image=has_image,
                      history=history, double_bos=self.double_bos,
                      image_tokens=self.image_tokens(image) if has_image else None)

  def image_tokens(self, image=None) -> int:
    """Visual tokens (prompt slots) of `image` (any input `images.decode` takes)."""
    model_cfg = self.config.model
    if model_cfg.variant != "llava_next":
      return infllava.num_image_tokens(model_cfg)
    if image is None:
      raise ValueError("a llava_next model's image slots depend on the image's size; give "
                       "the image")
    pil = images.decode(image)
    return anyres.num_image_tokens(pil.height, pil.width, model_cfg)

  def pixels(self, image) -> np.ndarray:
    return images.preprocess(image, infllava.input_size(self.config.model), self.aspect)

  def image_inputs(self, image_list: Sequence[Any]) -> tuple[Any, list[int | None]]:
    """The model's `pixels` for one image per row (None: a text-only row; all None: None),
    and each image's slot count (None: the model's fixed `num_image_tokens`)."""
    model_cfg = self.config.model
    if all(im is None for im in image_list):
      return None, [None] * len(image_list)
    if model_cfg.variant == "llava_next":
      pixels, counts = anyres_data.image_inputs(image_list, model_cfg)
      return {k: jnp.asarray(v[:, None]) for k, v in pixels.items()}, counts
    side = infllava.input_size(model_cfg)
    pixels = np.stack([images.zero_image(side) if im is None else self.pixels(im)
                       for im in image_list])[:, None]
    return jnp.asarray(pixels), [None] * len(image_list)

  def _sampling(self, sampling: generate.Sampling | None) -> generate.Sampling:
    sampling = sampling or generate.Sampling(max_new_tokens=32)
    return generate.Sampling(**{**sampling.__dict__,
                                "stop_ids": sampling.stop_ids or self.stop_ids})

  def generate_batch(self, image_list: Sequence[Any], questions: Sequence[str],
                     histories: Sequence[Sequence[tuple[str, str]]] | None = None,
                     sampling: generate.Sampling | None = None, seed: int = 0,
                     on_token=None) -> list[Answer]:
    """One `Answer` per (image, question[, history]), generated as one left-padded batch.

    An image of None makes that row text-only; `histories[i]` holds row i's earlier
    (question, answer) turns (its image belongs to the first question). `on_token` is
    `generate.generate_tokens`' host callback `(step, tokens [B])`. Raises ValueError for a
    question that cannot be asked: the image marker in its text (`prompt_ids`), or a prompt
    that, with `max_new_tokens`, does not fit the model's positions.
    """
    if len(image_list) != len(questions):
      raise ValueError(f"ask_batch: {len(image_list)} images but {len(questions)} questions")
    histories = [()] * len(questions) if histories is None else histories
    if len(histories) != len(questions):
      raise ValueError(f"ask_batch: {len(histories)} histories but {len(questions)} questions")
    sampling = self._sampling(sampling)
    pixels, counts = self.image_inputs(image_list)
    prompts = [prompt_ids(q, self.tokenizer, self.config.model, has_image=im is not None,
                          history=h, double_bos=self.double_bos, image_tokens=n)
               for im, q, h, n in zip(image_list, questions, histories, counts)]
    for row, prompt in enumerate(prompts):
      if len(prompt) + sampling.max_new_tokens > self.context_length:
        which = f"row {row}'s prompt" if len(prompts) > 1 else "the prompt"
        raise ContextLengthError(f"{which} has {len(prompt)} tokens and max_new_tokens "
                                 f"is {sampling.max_new_tokens}: together over the model's "
                                 f"{self.context_length} positions")
    tokens, mask = generate.left_pad(prompts, self.tokenizer.pad_token_id)
    extra = -tokens.shape[1] % self.length_bucket
    if extra:
      tokens = np.pad(tokens, ((0, 0), (extra, 0)), constant_values=self.tokenizer.pad_token_id)
      mask = np.pad(mask, ((0, 0), (extra, 0)))
    run = generate.compiled_generate(self.model, sampling, self.tokenizer.pad_token_id, on_token)
    out, lengths = run(self.params, jnp.asarray(tokens), jnp.asarray(mask), pixels,
                       jax.random.key(seed))
    out, lengths = np.asarray(out), np.asarray(lengths)
    answers = []
    for prompt, row, n in zip(prompts, out, lengths):
      ids = tuple(int(i) for i in row[:n])
      stopped = bool(ids) and ids[-1] in sampling.stop_ids
      answers.append(Answer(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                            len(prompt), "stop" if stopped else "length"))
    return answers

  def ask_batch(self, image_list: Sequence[Any], questions: Sequence[str],
                sampling: generate.Sampling | None = None, seed: int = 0,
                on_token=None, histories=None) -> list[str]:
    """One answer per (image, question) pair, generated as one left-padded batch."""
    return [a.text for a in self.generate_batch(image_list, questions, histories, sampling,
                                                seed, on_token)]

  def ask(self, image, question: str, history: Sequence[tuple[str, str]] = (),
          **kwargs) -> str:
    return self.ask_batch([image], [question], histories=[history], **kwargs)[0]

  def stream(self, image, question: str, on_text: Callable[[str], None],
             history: Sequence[tuple[str, str]] = (), sampling: generate.Sampling | None = None,
             seed: int = 0) -> Answer:
    """Answers one question, calling `on_text(piece)` as text becomes final.

    The pieces concatenate to the returned `Answer.text`. Generations on this Assistant
    run one at a time (`self.lock`): the token callback is shared by all of them.
    """
    sampling = self._sampling(sampling)
    text_stream = TextStream(self.tokenizer, sampling.stop_ids, on_text)
    with self.lock:
      self._relay.start(text_stream)
      try:
        answer = self.generate_batch([image], [question], [history], sampling, seed,
                                     on_token=self._relay)[0]
        jax.effects_barrier()  # every token callback has run
      finally:
        self._relay.start(None)
    text_stream.finish(answer.text)
    return answer
