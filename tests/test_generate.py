"""Batched cached generation equals a no-cache argmax loop, and rows do not see each other."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from infllava_jax import generate
from infllava_jax.config import load_config
from infllava_jax.model import infllava


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("configs/tiny.py").model
  model = infllava.build_model(cfg)
  params = model.init(jax.random.key(1), *infllava.dummy_inputs(cfg))["params"]
  return cfg, model, params


def _prompts(cfg, rng, lengths):
  n_img = infllava.num_image_tokens(cfg)
  prompts = []
  for extra in lengths:
    text = list(rng.integers(1, cfg.llm.vocab_size, size=extra))
    prompts.append(text[:1] + [cfg.image_token_id] * n_img + text[1:])
  return prompts


def _prompt_batch(cfg, seed, lengths):
  """Random prompts with image slots, left-padded: (prompts, tokens [B, T], mask [B, T],
  pixels [B, 1, S, S, 3])."""
  rng = np.random.default_rng(seed)
  prompts = _prompts(cfg, rng, lengths)
  side = cfg.dcm.image_size
  pixels = jnp.asarray(rng.normal(size=(len(lengths), 1, side, side, 3)), jnp.float32)
  tokens, mask = generate.left_pad(prompts, pad_id=0)
  return prompts, jnp.asarray(tokens), jnp.asarray(mask), pixels


def _argmax_loop(model, params, prompt, pixels, steps):
  """Reference: re-run the full forward (no cache) for every new token."""
  seq = list(prompt)
  for _ in range(steps):
    logits, _ = model.apply({"params": params}, jnp.asarray([seq]), pixels)
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(prompt):]


def test_greedy_batch_equals_single_rows_and_uncached_loop(tiny):
  cfg, model, params = tiny
  prompts, tokens, mask, pixels = _prompt_batch(cfg, 0, [3, 9, 5])
  sampling = generate.Sampling(max_new_tokens=6)
  run = generate.compiled_generate(model, sampling, pad_id=0)
  batched, lengths = run(params, tokens, mask, pixels, jax.random.key(0))
  assert lengths.tolist() == [6, 6, 6]
  for row, prompt in enumerate(prompts):
    t, m = generate.left_pad([prompt], pad_id=0)
    alone, _ = run(params, jnp.asarray(t), jnp.asarray(m), pixels[row:row + 1], jax.random.key(0))
    np.testing.assert_array_equal(batched[row], alone[0])
    assert batched[row].tolist() == _argmax_loop(model, params, prompt, pixels[row:row + 1], 6)


def test_for_decoding_unrolls_the_llm_and_generates_the_same(tiny):
  cfg, model, params = tiny
  unrolled, flat = generate.for_decoding(model, params)
  assert "layers" not in flat["llm"] and f"layers_{cfg.llm.depth - 1}" in flat["llm"]
  assert flat["projector"] is params["projector"]
  again, same = generate.for_decoding(unrolled, flat)
  assert same is flat and not again.llm_scan_layers
  _, tokens, mask, pixels = _prompt_batch(cfg, 2, [2, 7])
  args = (tokens, mask, pixels)
  want, _ = model.apply({"params": params}, *args[:1], pixels)
  got, _ = unrolled.apply({"params": flat}, *args[:1], pixels)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  sampling = generate.Sampling(max_new_tokens=5)
  scanned_out, _ = generate.compiled_generate(model, sampling, pad_id=0)(
      params, *args, jax.random.key(0))
  unrolled_out, _ = generate.compiled_generate(unrolled, sampling, pad_id=0)(
      flat, *args, jax.random.key(0))
  np.testing.assert_array_equal(unrolled_out, scanned_out)
  # Handed over (`consume`), the stacked arrays are freed once unrolled; the layers agree.
  owned = jax.tree.map(jnp.array, params)
  _, consumed = generate.for_decoding(model, owned, consume=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(owned["llm"]["layers"]))
  assert not any(x.is_deleted() for x in jax.tree.leaves(consumed))
  jax.tree.map(np.testing.assert_array_equal, consumed, flat)


def test_sampling_values_are_arguments_of_one_compiled_program(tiny):
  cfg, model, params = tiny
  _, tokens, mask, pixels = _prompt_batch(cfg, 3, [3, 6])
  generate._compiled_program.cache_clear()
  # top_k 5 and 7 share a top_k width of 8 (Sampling.program); 40 takes a second program.
  for values in (dict(temperature=0.7, top_p=0.9, top_k=5),
                 dict(temperature=1.3, top_p=0.6, top_k=7),
                 dict(temperature=1.0, top_p=1.0, top_k=40)):
    sampling = generate.Sampling(max_new_tokens=4, **values)
    shared, _ = generate.compiled_generate(model, sampling, pad_id=0)(
        params, tokens, mask, pixels, jax.random.key(7))
    # The same tokens as a program with these values compiled in.
    baked, _ = jax.jit(functools.partial(generate.generate_tokens, model, sampling=sampling,
                                         pad_id=0))(params, tokens, mask, pixels,
                                                    jax.random.key(7))
    np.testing.assert_array_equal(shared, baked)
    if values["top_k"] == 7:
      assert generate._compiled_program.cache_info().currsize == 1
      assert generate._compiled_program(model, sampling.program(), 0, None)._cache_size() == 1
  assert generate._compiled_program.cache_info().currsize == 2
  # max_new_tokens 3 and 9 share the 16-token program; greedy, 3 tokens are 9's first 3.
  greedy = {n: generate.compiled_generate(model, generate.Sampling(max_new_tokens=n), pad_id=0)(
      params, tokens, mask, pixels, jax.random.key(0)) for n in (3, 9)}
  assert generate._compiled_program.cache_info().currsize == 3
  assert greedy[3][0].shape == (2, 3) and greedy[3][1].tolist() == [3, 3]
  np.testing.assert_array_equal(greedy[3][0], greedy[9][0][:, :3])


def test_stop_ids_end_rows_and_pad_after(tiny):
  cfg, model, params = tiny
  _, tokens, mask, pixels = _prompt_batch(cfg, 1, [4, 4])
  free = generate.compiled_generate(model, generate.Sampling(max_new_tokens=5), pad_id=0)
  out, _ = free(params, tokens, mask, pixels, jax.random.key(0))
  stop = int(out[0, 1])  # make row 0 stop at its second token
  stopped = generate.compiled_generate(
      model, generate.Sampling(max_new_tokens=5, stop_ids=(stop,)), pad_id=-1)
  out2, lengths = stopped(params, tokens, mask, pixels, jax.random.key(0))
  first_stop = out[0].tolist().index(stop)
  assert lengths[0] == first_stop + 1
  assert out2[0, :first_stop + 1].tolist() == out[0, :first_stop + 1].tolist()
  assert (np.asarray(out2[0, first_stop + 1:]) == -1).all()


def test_sampling_is_seeded_and_respects_top_k():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
  sampling = generate.Sampling(temperature=1.0, top_k=3)
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  for seed in range(20):
    tok = generate.choose_next(logits, jax.random.key(seed), sampling)
    assert all(int(t) in top3[i] for i, t in enumerate(tok))
  a = generate.choose_next(logits, jax.random.key(5), generate.Sampling(temperature=0.7, top_p=0.5))
  b = generate.choose_next(logits, jax.random.key(5), generate.Sampling(temperature=0.7, top_p=0.5))
  np.testing.assert_array_equal(a, b)
  # top_p tiny keeps only the most likely token.
  only = generate.choose_next(logits, jax.random.key(3), generate.Sampling(temperature=1.0, top_p=1e-6))
  np.testing.assert_array_equal(only, jnp.argmax(logits, -1))
  # A k beyond the vocabulary keeps every token (HF clamps it): the same draw as no cut.
  for seed in range(5):
    np.testing.assert_array_equal(
        generate.choose_next(logits, jax.random.key(seed),
                             generate.Sampling(temperature=1.0, top_k=51)),
        generate.choose_next(logits, jax.random.key(seed), generate.Sampling(temperature=1.0)))


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.7, 0, 0.8), (1.3, 5, 1.0), (0.7, 8, 0.6), (1.0, 60, 0.95), (0.5, 1, 0.3),
])
def test_sampling_logits_equal_hugging_face_warpers(temperature, top_k, top_p):
  torch = pytest.importorskip("torch")
  from transformers import generation
  rng = np.random.default_rng(top_k)
  logits = rng.normal(size=(6, 50)).astype(np.float32) * 3
  logits[0, :10] = logits[0, 0]  # ties at the top-k and top-p boundaries
  warpers = [generation.TemperatureLogitsWarper(temperature)]
  warpers += [generation.TopKLogitsWarper(top_k)] if top_k else []
  warpers += [generation.TopPLogitsWarper(top_p)] if top_p < 1 else []
  expected = torch.from_numpy(logits)
  for warper in warpers:  # HF's order: temperature, top-k, top-p
    expected = warper(None, expected)
  ours = generate.sampling_logits(jnp.asarray(logits), generate.Sampling(
      temperature=temperature, top_k=top_k, top_p=top_p))
  expected = expected.numpy()
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  kept = np.isfinite(expected)
  np.testing.assert_allclose(np.asarray(ours)[kept], expected[kept], rtol=1e-6)


@pytest.mark.parametrize("fields, words", [
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1, got 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(temperature=-1.0), "temperature must be finite and >= 0"),
    (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_p=1.5), "top_p must be in (0, 1]"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
])
def test_sampling_refuses_out_of_range_values(fields, words):
  with pytest.raises(ValueError, match=re.escape(words)):
    generate.Sampling(**fields)


def test_sampling_takes_numpy_integers():
  assert generate.Sampling(max_new_tokens=np.int64(3), top_k=np.int32(2)).max_new_tokens == 3
