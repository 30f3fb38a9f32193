"""Batched generation: one jitted prefill, then a `lax.while_loop` of cached decode steps.

Prompts of different lengths are left-padded into one [B, T] batch; padding slots get
segment id 0 so no real token attends them, and each row's positions count its own tokens
only, so a row's output does not depend on its neighbours. Every buffer has a fixed shape
(the KV cache holds T + max_new_tokens slots), so nothing recompiles per step.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from infllava_jax import xla_options
from infllava_jax.model import kv_cache, layers, llama
from infllava_jax.model.infllava import InfLlava

# The smallest max_new_tokens a compiled generation's buffers take (`Sampling.program`).
MIN_PROGRAM_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen: greedy at temperature 0 (top_k, top_p unused), else
  sampled from softmax(logits / temperature) after the top-k cut (0: none) and the nucleus
  cut (top_p in (0, 1]; 1: none). Out-of-range values raise ValueError here, so every caller
  (API, CLIs, server) refuses them alike."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self):
    problems = []
    if not _is_count(self.max_new_tokens) or self.max_new_tokens < 1:
      problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
    if not 0.0 <= self.temperature < float("inf"):  # also refuses NaN
      problems.append(f"temperature must be finite and >= 0 (0: greedy), got "
                      f"{self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      problems.append(f"top_p must be in (0, 1] (1: no nucleus cut), got {self.top_p!r}")
    if not _is_count(self.top_k) or self.top_k < 0:
      problems.append(f"top_k must be an integer >= 0 (0: no top-k cut), got {self.top_k!r}")
    if problems:
      raise ValueError("Sampling: " + "; ".join(problems))

  def settings(self) -> dict[str, jax.Array]:
    """The values a compiled generation takes as arguments: temperature, top_p, top_k and
    max_new_tokens as scalars (`compiled_generate`)."""
    return {"temperature": jnp.float32(self.temperature), "top_p": jnp.float32(self.top_p),
            "top_k": jnp.int32(self.top_k), "max_new_tokens": jnp.int32(self.max_new_tokens)}

  def program(self) -> "Sampling":
    """What a compiled generation is built for: this Sampling with the `settings` values
    replaced by stand-ins that keep only which steps run (greedy or sampled, a top-p cut),
    a top-k cut's k rounded up to a power of two (the static width of its `lax.top_k`) and
    max_new_tokens rounded up to a power of two, at least `MIN_PROGRAM_TOKENS` (the static
    size of the output and cache buffers), so settings differing in those values alone
    share one program: a server whose clients each send their own max_tokens compiles a
    few programs, not one per value."""
    top_k = 1 << (self.top_k - 1).bit_length() if self.top_k else 0
    tokens = max(MIN_PROGRAM_TOKENS, 1 << (self.max_new_tokens - 1).bit_length())
    return dataclasses.replace(self, temperature=float(self.temperature > 0),
                               top_p=0.5 if self.top_p < 1 else 1.0, top_k=top_k,
                               max_new_tokens=tokens)


def _is_count(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens [B, T] int32, mask [B, T] int32), padding on the left."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("left_pad: every prompt needs at least one token")
  length = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
    mask[row, length - len(prompt):] = 1
  return tokens, mask


def choose_next(logits: jax.Array, rng: jax.Array, sampling: Sampling,
                settings: dict[str, jax.Array] | None = None) -> jax.Array:
  """[B, V] float32 logits -> [B] int32 next tokens (greedy, or temperature/top-k/top-p).

  `sampling` decides which steps run; their values come from `settings` (traced scalars,
  `Sampling.settings()`), by default `sampling`'s own.
  """
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, sampling_logits(logits, sampling, settings),
                                axis=-1).astype(jnp.int32)


def sampling_logits(logits: jax.Array, sampling: Sampling,
                    settings: dict[str, jax.Array] | None = None) -> jax.Array:
  """[B, V] logits / temperature, -inf outside the top-k and then the top-p cut, in the
  order of Hugging Face's logits warpers (temperature, top-k, top-p). Which cuts run is
  `sampling`'s; the values are `settings`' (see `choose_next`)."""
  settings = sampling.settings() if settings is None else settings
  logits = logits / settings["temperature"]
  if sampling.top_k > 0:  # a k beyond the vocabulary keeps every token, as HF's
    # The k largest of `sampling.top_k` (the program's width, >= the k of `settings`).
    width = min(sampling.top_k, logits.shape[-1])
    k = jnp.clip(settings["top_k"], 1, width)
    kth = lax.dynamic_slice_in_dim(lax.top_k(logits, width)[0], k - 1, 1, axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if sampling.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= settings["top_p"]
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return logits


def for_decoding(model: InfLlava | llama.Llama, params, consume: bool = False
                 ) -> tuple[InfLlava | llama.Llama, Any]:
  """The same model with its LLM layers unrolled, and params to match (call once, outside jit).

  A scanned decode step slices every layer's weights out of the `[depth, ...]` stacks, and
  XLA:CPU copies each slice before its matmul at every token: a second pass over the
  weights in a loop that is bound by reading them. Unrolled layers read their own arrays
  (docs/performance.md#unrolled-layers). Params already unrolled are returned as they are.
  `consume`: see `llama.unstack_layers`.
  """
  if isinstance(model, llama.Llama):
    if "layers" not in params:
      return model.clone(scan_layers=False), params
    return (model.clone(scan_layers=False),
            llama.unstack_layers(params, model.cfg.depth, consume))
  if "layers" not in params["llm"]:
    return model.clone(llm_scan_layers=False), params
  llm = llama.unstack_layers(params["llm"], model.cfg.llm.depth, consume)
  return model.clone(llm_scan_layers=False), {**params, "llm": llm}


def generate_tokens(model: InfLlava, params, tokens: jax.Array, mask: jax.Array,
                    pixels: jax.Array | None, rng: jax.Array, sampling: Sampling,
                    pad_id: int, on_token: Callable | None = None,
                    settings: dict[str, jax.Array] | None = None
                    ) -> tuple[jax.Array, jax.Array]:
  """Generates up to `sampling.max_new_tokens` tokens per row (call it under `jax.jit`).

  Args:
    tokens: [B, T] int32 left-padded prompts (image slots included).
    mask: [B, T] int32, 1 on prompt tokens and 0 on padding.
    pixels: [B, M, H, W, 3] the rows' images, or None.
    on_token: optional host callback `(step, tokens [B]) -> None`, for streaming.
    settings: the sampling values (`Sampling.settings()`, traced), by default `sampling`'s.
  Returns:
    (generated [B, N] int32 with `pad_id` after a row stops, lengths [B] int32), where a
    row's length counts its tokens up to and including its stop id.
  """
  dtype = layers.dtype_of(model.cfg.dtype)

  def forward(step_tokens, positions, segment_ids, cache, prefill):
    hidden, cache = model.apply({"params": params}, step_tokens, pixels if prefill else None,
                                positions, segment_ids, cache, head=False)
    return last_logits(hidden, nn.meta.unbox(params["llm"]["lm_head"]["kernel"]), dtype), cache

  return decode(forward, model.cfg.llm, dtype, tokens, mask, rng, sampling, pad_id, on_token,
                per_layer_cache=not model.llm_scan_layers, settings=settings)


def generate_text_tokens(llm: llama.Llama, params, tokens: jax.Array, mask: jax.Array,
                         rng: jax.Array, sampling: Sampling, pad_id: int,
                         on_token: Callable | None = None) -> tuple[jax.Array, jax.Array]:
  """`generate_tokens` for the language model alone (`llama.Llama` params, no image slots)."""
  dtype = layers.dtype_of(llm.dtype)

  def forward(step_tokens, positions, segment_ids, cache, prefill):
    del prefill
    hidden, cache = llm.apply({"params": params}, step_tokens, positions, segment_ids, cache,
                              head=False, method="tokens_to_logits")
    return last_logits(hidden, nn.meta.unbox(params["lm_head"]["kernel"]), dtype), cache

  return decode(forward, llm.cfg, dtype, tokens, mask, rng, sampling, pad_id, on_token,
                per_layer_cache=not llm.scan_layers)


def last_logits(hidden: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """The lm_head on the last position only: hidden [B, T, D] -> [B, V] float32 logits. The
  prefill needs no others, and whole ones would be its largest buffer (8B, batch 8, a
  704-token prompt: 2.7 GiB of float32)."""
  return llama.project_to_vocab(hidden[:, -1:], kernel, dtype)[:, 0]


def decode(forward: Callable, llm_cfg, cache_dtype, tokens: jax.Array, mask: jax.Array,
           rng: jax.Array, sampling: Sampling, pad_id: int,
           on_token: Callable | None = None, per_layer_cache: bool = False,
           settings: dict[str, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
  """The prefill and the decode loop shared by `generate_tokens` and `generate_text_tokens`.

  `forward(tokens [B, T], positions [B, T], segment_ids [B, T], cache, prefill: bool)` returns
  (the last position's logits [B, V], cache); it is called once on the prompts
  (prefill=True), then on one token per row per step; `per_layer_cache` is
  `kv_cache.init_cache`'s (for unrolled layers). `settings`: as `choose_next`'s; its
  max_new_tokens (at most `sampling`'s, the buffers' size) ends the loop. Returns what
  `generate_tokens` does.
  """
  batch, length = tokens.shape
  steps = sampling.max_new_tokens  # the buffers' size
  limit = steps if settings is None else settings["max_new_tokens"]  # <= steps
  cache = kv_cache.init_cache(llm_cfg, batch, length + steps, cache_dtype, per_layer_cache)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
  logits, cache = forward(tokens, positions, mask.astype(jnp.int32), cache, True)
  stop_ids = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)
  next_pos = positions[:, -1] + 1

  def is_stop(tok):
    return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

  rng, first_rng = jax.random.split(rng)
  first = choose_next(logits, first_rng, sampling, settings)
  out = jnp.full((batch, steps), pad_id, jnp.int32).at[:, 0].set(first)
  done = is_stop(first)
  lengths = jnp.ones((batch,), jnp.int32)
  if on_token is not None:
    jax.debug.callback(on_token, 0, first)

  def cond(state):
    step, _, _, done, *_ = state
    return jnp.logical_and(step < limit, jnp.logical_not(jnp.all(done)))

  def body(state):
    step, out, cache, done, lengths, rng = state
    prev = out[:, step - 1]
    logits, cache = forward(prev[:, None], (next_pos + step - 1)[:, None],
                            jnp.ones((batch, 1), jnp.int32), cache, False)
    rng, step_rng = jax.random.split(rng)
    tok = jnp.where(done, pad_id, choose_next(logits, step_rng, sampling, settings))
    if on_token is not None:
      jax.debug.callback(on_token, step, tok)
    lengths = lengths + jnp.logical_not(done).astype(jnp.int32)
    done = jnp.logical_or(done, is_stop(tok))
    return step + 1, out.at[:, step].set(tok), cache, done, lengths, rng

  _, out, _, _, lengths, _ = lax.while_loop(
      cond, body, (jnp.int32(1), out, cache, done, lengths, rng))
  return out, lengths


def compiled_generate(model: InfLlava, sampling: Sampling, pad_id: int,
                      on_token: Callable | None = None) -> Callable:
  """`generate_tokens` for `sampling`, jitted: `(params, tokens, mask, pixels, rng)` ->
  (generated, lengths).

  The program is compiled once per (model, `sampling.program()`, pad_id, on_token) and
  reused: temperature, top_p, top_k and max_new_tokens reach it as arguments, so a chat or
  a server whose requests differ in those values alone (top_k and max_new_tokens within
  the same power of two) compiles nothing new. generated: [B, sampling.max_new_tokens].
  """
  run = _compiled_program(model, sampling.program(), pad_id, on_token)
  settings, width = sampling.settings(), sampling.max_new_tokens

  def generate_with(params, tokens, mask, pixels, rng):
    out, lengths = run(params, tokens, mask, pixels, rng, settings=settings)
    return out[:, :width], lengths

  return generate_with


@functools.lru_cache(maxsize=16)
def _compiled_program(model: InfLlava, program: Sampling, pad_id: int,
                      on_token: Callable | None):
  return jax.jit(functools.partial(generate_tokens, model, sampling=program, pad_id=pad_id,
                                   on_token=on_token),
                 compiler_options=xla_options.compiler_options(jax.default_backend()))
