"""The assembled model: slot writing, both variants end to end, real-size shapes, sharded init."""

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import pytest

from infllava_jax import sharding
from infllava_jax.config import load_config
from infllava_jax.model import dcm, infllava


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_write_image_tokens_fills_slots_in_order():
  text = jnp.zeros((2, 7, 3))
  is_slot = jnp.array([[0, 1, 1, 0, 1, 1, 0],
                       [1, 1, 0, 0, 0, 0, 0]], bool)
  visual = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3) + 1
  out = infllava.write_image_tokens(text, is_slot, visual)
  np.testing.assert_array_equal(out[0, [1, 2, 4, 5]], visual[0])
  np.testing.assert_array_equal(out[1, [0, 1]], visual[1, :2])
  np.testing.assert_array_equal(out[0, [0, 3, 6]], 0)
  np.testing.assert_array_equal(out[1, 2:], 0)


@pytest.mark.parametrize("variant", ["infllava", "llava", "s2"])
def test_forward_writes_visual_tokens_into_slots(variant):
  cfg = load_config(f"configs/tiny.py:{variant}").model
  model = infllava.build_model(cfg)
  n_img = infllava.num_image_tokens(cfg)
  side = infllava.input_size(cfg)
  rng = np.random.default_rng(0)
  text = rng.integers(1, cfg.llm.vocab_size, size=(2, 5 + n_img)).astype(np.int32)
  tokens = text.copy()
  tokens[:, 2:2 + n_img] = cfg.image_token_id
  pixels = jnp.asarray(rng.normal(size=(2, 1, side, side, 3)), jnp.float32)
  params = model.init(jax.random.key(0), *infllava.dummy_inputs(cfg))["params"]
  logits, _ = model.apply({"params": params}, jnp.asarray(tokens), pixels)
  assert logits.shape == (2, tokens.shape[1], cfg.llm.vocab_size)

  # The same logits, built by hand: embeddings with the encoded image spliced in.
  visual = model.apply({"params": params}, pixels[:, 0], method=infllava.InfLlava.encode_images)
  assert visual.shape == (2, n_img, cfg.llm.width)

  def by_hand(module, tokens, visual):
    embeds = module.llm.embed(jnp.where(tokens == cfg.image_token_id, 0, tokens))
    embeds = embeds.at[:, 2:2 + n_img].set(visual)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return module.llm(embeds, positions)[0]

  expected = model.apply({"params": params}, jnp.asarray(tokens), visual, method=by_hand)
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  # The image matters: another image changes the logits after the slots.
  other, _ = model.apply({"params": params}, jnp.asarray(tokens), pixels[::-1])
  assert np.abs(np.asarray(other - logits)[:, 2 + n_img:]).max() > 1e-4


def test_text_only_batches_trace_no_vision_work():
  """pixels [B, 0, H, W, 3] (data.max_images_per_row=0): the LLM alone, as pixels=None."""
  cfg = load_config("configs/tiny.py:infllava").model
  model = infllava.build_model(cfg)
  side = infllava.input_size(cfg)
  params = model.init(jax.random.key(0), *infllava.dummy_inputs(cfg))["params"]
  tokens = jnp.asarray(np.random.default_rng(0).integers(1, 100, size=(2, 7)), jnp.int32)
  no_images = jnp.zeros((2, 0, side, side, 3), jnp.float32)
  logits, _ = model.apply({"params": params}, tokens, no_images)
  text_only, _ = model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(logits, text_only)
  # The same traced program as without pixels: nothing of CLIP, the DEM or the projector.
  def program(*inputs):
    return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, *inputs))(params))
  assert program(tokens, no_images) == program(tokens)
  assert program(tokens, jnp.zeros((2, 1, side, side, 3))) != program(tokens)


def test_processor_size_images_are_resized_inside_the_model():
  """dcm.processor_size 84 on the 252 px tiny model: encode_images takes 84 px images and
  upsamples them as `dcm.resize` does (the released repository's 336 -> 1008 path)."""
  cfg = load_config("configs/tiny.py").model
  small = load_config("configs/tiny.py", ["--config.model.dcm.processor_size=84"]).model
  assert infllava.input_size(cfg) == 252 and infllava.input_size(small) == 84
  assert infllava.dummy_inputs(small)[1].shape == (1, 1, 84, 84, 3)
  params = infllava.build_model(cfg).init(jax.random.key(0), *infllava.dummy_inputs(cfg))
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 84, 84, 3)), jnp.float32)
  encode = lambda c, x: infllava.build_model(c).apply(params, x,
                                                       method=infllava.InfLlava.encode_images)
  upsampled = dcm.resize(images, (252, 252), "bicubic")
  np.testing.assert_allclose(encode(small, images), encode(cfg, upsampled), atol=1e-6)
  with pytest.raises(ValueError, match="processor_size=42 applies to the infllava variant"):
    infllava.input_size(load_config("configs/tiny.py:llava",
                                    ["--config.model.dcm.processor_size=42"]).model)


def test_released_config_shapes_without_allocating():
  cfg = load_config("configs/infllava_8b.py").model
  model = infllava.build_model(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *infllava.dummy_inputs(cfg))
  params = nn.meta.unbox(abstract["params"])
  assert _count(params["dem"]) == 4_400_256
  assert _count(params["projector"]) == 20_979_712
  assert infllava.num_image_tokens(cfg) == 576
  # LLaMA-3-8B with the <pad> row: embeddings + 32 blocks + norm + untied head.
  d, f, v, kv = 4096, 14336, 128257, 1024
  block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
  assert _count(params["llm"]) == 2 * v * d + 32 * block + d
  # CLIP-L/14-336 up to hidden_states[-2]: 23 of its 24 layers, no post_layernorm.
  w = 1024
  clip_layer = 4 * (w * w + w) + 2 * (w * 4096) + 4096 + w + 4 * w
  assert _count(params["vision"]) == 14 * 14 * 3 * w + w + 577 * w + 2 * w + 23 * clip_layer


def test_params_init_sharded_and_forward_runs():
  devices = jax.devices()
  assert len(devices) == 8, "conftest sets 8 simulated devices"
  cfg = load_config("configs/tiny.py").model
  model = infllava.build_model(cfg)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  inputs = infllava.dummy_inputs(cfg, batch=4)
  variables, shardings = sharding.init_sharded(model.init, mesh, jax.random.key(0), *inputs)
  params = variables["params"]
  q = params["llm"]["layers"]["attn"]["q"]["kernel"]  # [L, D, H*K]: embed->fsdp, heads->tensor
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
  head = params["llm"]["lm_head"]["kernel"]
  assert head.addressable_shards[0].data.shape == (head.shape[0] // 2, head.shape[1] // 2)
  fc1 = params["vision"]["layers"]["mlp"]["fc1"]["kernel"]
  assert fc1.addressable_shards[0].data.size == fc1.size // 4

  tokens = jax.device_put(inputs[0], sharding.batch_sharding(mesh, 2))
  pixels = jax.device_put(inputs[1], sharding.batch_sharding(mesh, 5))
  with jax.set_mesh(mesh), sharding.axis_rules():
    logits, _ = jax.jit(model.apply)(variables, tokens, pixels)
  single, _ = jax.jit(model.apply)(jax.device_get(variables), *jax.device_get(inputs))
  np.testing.assert_allclose(logits, single, atol=1e-5, rtol=1e-5)
