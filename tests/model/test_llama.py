"""LLaMA decoder: parity with HF `LlamaForCausalLM` (float32), KV cache, packing, configs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
import flax.linen as nn

from infllava_jax.convert import mapping
from infllava_jax.convert.llama_table import llama_config_from_hf, llama_table, tie_lm_head
from infllava_jax.model import kv_cache, layers, llama
from infllava_jax.presets import infllava_8b

HF_TOL = 1e-4
TOL = 1e-5
T = 24

ROPE_LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)


def hf_config_dict(new_spelling: bool) -> dict:
  """A tiny LLaMA-3.1-style config.json in transformers 5's or the released spelling."""
  base = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu",
              attention_bias=False, mlp_bias=False, tie_word_embeddings=False)
  if new_spelling:
    return dict(base, dtype="float32", rope_parameters=dict(ROPE_LLAMA3, rope_theta=500000.0))
  return dict(base, torch_dtype="float32", rope_theta=500000.0, rope_scaling=dict(ROPE_LLAMA3))


@pytest.fixture(scope="module")
def llm_cfg():
  return llama_config_from_hf(hf_config_dict(new_spelling=True))


@pytest.fixture(scope="module")
def hf_model():
  config = transformers.LlamaConfig(**hf_config_dict(new_spelling=True),
                                    attn_implementation="eager")
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  # HF's init (std 0.02, unit norms) gives near-zero logits where any bug hides: use O(1)
  # activations and non-unit norm weights instead.
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "norm" in name:
        tensor.uniform_(0.5, 1.5)
      elif "embed" in name:
        tensor.normal_(0.0, 1.0)
      else:
        tensor.normal_(0.0, tensor.shape[1] ** -0.5)
  return model


def init_shapes(model, batch=1, length=1):
  tokens = jnp.zeros((batch, length), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, tokens,
                                           method="tokens_to_logits"))


@pytest.fixture(scope="module")
def params(llm_cfg, hf_model):
  tensors = [(n, t.detach().numpy()) for n, t in hf_model.state_dict().items()]
  expected = nn.meta.unbox(init_shapes(llama.Llama(llm_cfg))["params"])
  converted = mapping.torch_to_params(tensors, llama_table(llm_cfg), expected, source="tiny")
  return jax.tree_util.tree_map(jnp.asarray, converted)


@pytest.fixture(scope="module")
def run(llm_cfg, params):
  """run(tokens, positions, segment_ids=None, cache=None) -> (logits, cache), jitted."""
  model = llama.Llama(llm_cfg)
  return jax.jit(lambda *args: model.apply({"params": params}, *args,
                                           method="tokens_to_logits"))


@pytest.fixture(scope="module")
def tokens():
  return np.random.default_rng(0).integers(0, 256, (2, T)).astype(np.int32)


def arange_positions(batch, length, start=0):
  return np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (batch, length))


def max_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def test_logits_match_hf(run, hf_model, tokens):
  with torch.no_grad():
    want = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
  got, cache = run(tokens, arange_positions(2, T))
  assert cache is None and got.dtype == jnp.float32
  assert np.std(want) > 0.3  # logits O(1): the tolerance below means something
  assert max_err(got, want) <= HF_TOL


def test_logits_match_hf_at_far_positions(run, hf_model, tokens):
  # Positions beyond original_max_position_embeddings, where the llama3 bands differ.
  positions = arange_positions(2, T, start=100)
  with torch.no_grad():
    want = hf_model(torch.from_numpy(tokens).long(),
                    position_ids=torch.from_numpy(np.array(positions)).long()).logits.numpy()
  got, _ = run(tokens, positions)
  assert max_err(got, want) <= HF_TOL


def decode(run, llm_cfg, tokens, positions, segments, prefill, max_len=32, per_layer=False):
  """Prefill `prefill` tokens, then feed the rest one at a time: logits of every step [B, T, V]."""
  b, t = tokens.shape
  cache = kv_cache.init_cache(llm_cfg, b, max_len, jnp.float32, per_layer)
  out, cache = run(tokens[:, :prefill], positions[:, :prefill], segments[:, :prefill], cache)
  steps = [out]
  for i in range(prefill, t):
    out, cache = run(tokens[:, i:i + 1], positions[:, i:i + 1], segments[:, i:i + 1], cache)
    steps.append(out)
  assert int(cache.index) == t
  return np.concatenate(steps, axis=1)


def test_kv_cache_prefill_then_decode_equals_full_forward(run, llm_cfg, tokens):
  positions = arange_positions(2, T)
  full, _ = run(tokens, positions)
  got = decode(run, llm_cfg, tokens, positions, np.ones_like(tokens), prefill=T - 4)
  assert max_err(got, full) <= TOL


def left_padded(tokens, pad):
  """Row 1 shifted right by `pad` slots of padding (segment 0) at the front."""
  t = tokens.shape[1]
  padded = tokens.copy()
  padded[1] = np.concatenate([np.zeros(pad, np.int32), tokens[1, :t - pad]])
  segments = np.ones_like(tokens)
  segments[1, :pad] = 0
  positions = np.array(arange_positions(2, t))
  positions[1] = np.concatenate([np.zeros(pad, np.int32), np.arange(t - pad)])
  return padded, positions, segments


def test_left_padded_row_equals_unpadded(run, llm_cfg, tokens):
  pad = 5
  padded, positions, segments = left_padded(tokens, pad)
  alone, _ = run(tokens[1:, :T - pad], arange_positions(1, T - pad))
  batched, _ = run(padded, positions, segments)
  assert max_err(batched[1, pad:], alone[0]) <= TOL
  cached = decode(run, llm_cfg, padded, positions, segments, prefill=T - 4)
  assert max_err(cached[1, pad:], alone[0]) <= TOL
  # Row 0 has no padding and is unaffected by its neighbour's.
  full, _ = run(tokens, arange_positions(2, T))
  assert max_err(cached[0], full[0]) <= TOL


def test_packed_segments_equal_separate_runs(run, tokens):
  lengths = (10, 10)  # then 4 slots of padding
  positions, segments = packed_inputs(lengths, T)
  packed, _ = run(tokens[:1], positions, segments)
  start = 0
  for n in lengths:
    alone, _ = run(tokens[:1, start:start + n], arange_positions(1, n))
    assert max_err(packed[0, start:start + n], alone[0]) <= TOL
    start += n
  assert np.all(np.isfinite(np.asarray(packed)))  # padding rows too: no NaN to leak into grads


def packed_inputs(lengths, total):
  """segment_ids and per-segment positions [1, total] for segments of `lengths`, then padding."""
  segments = np.zeros((1, total), np.int32)
  positions = np.zeros((1, total), np.int32)
  start = 0
  for seg, n in enumerate(lengths, 1):
    segments[0, start:start + n] = seg
    positions[0, start:start + n] = np.arange(n)
    start += n
  return positions, segments


@pytest.mark.parametrize("impl,chunk", [(None, 10), ("xla", 0)])
def test_attention_paths_agree(llm_cfg, params, run, tokens, impl, chunk):
  """Causal chunking (uneven chunks 10, 10, 4) and jax.nn.dot_product_attention equal the
  default one-block `grouped_attention`, plain causal and packed."""
  model = llama.Llama(llm_cfg, attention_impl=impl, attention_chunk=chunk)
  other = jax.jit(lambda *args: model.apply({"params": params}, *args,
                                            method="tokens_to_logits"))
  positions = arange_positions(2, T)
  assert max_err(other(tokens, positions)[0], run(tokens, positions)[0]) <= TOL
  positions, segments = packed_inputs((10, 10), T)
  assert max_err(other(tokens[:1], positions, segments)[0],
                 run(tokens[:1], positions, segments)[0]) <= TOL
  # Through the KV cache (heads-major; jax's kernel gets it swapped back to its layout).
  positions = arange_positions(2, T)
  cached = decode(other, llm_cfg, tokens, positions, np.ones_like(tokens), prefill=T - 4)
  assert max_err(cached, run(tokens, positions)[0]) <= TOL


@pytest.mark.parametrize("platform,batch", [("cpu", 2), ("cpu", 1), ("gpu", 2)])
def test_a_decode_step_copies_no_cache(llm_cfg, params, run, tokens, platform, batch,
                                       monkeypatch):
  """The cache is laid out as the attention products read it ([B*KVH, S, K]): a compiled
  decode step writes it in place and copies no cache-sized array. A [B, S, KVH, K] cache
  was transposed whole, per layer, at every step; a [B, KVH, S, K] one, at batch 1, was
  written twice (once as the step's output, once squeezed for the products) and so copied.
  Also where GPU picks jax's fused kernel (simulated: on CPU that kernel runs its XLA form)
  for prefill and `heads_major_attention` for decode steps: prefill + decode still equal
  the full forward."""
  monkeypatch.setattr(layers, "compute_platform", lambda: platform)
  if platform == "gpu":
    model = llama.Llama(llm_cfg)
    fn = jax.jit(lambda *args: model.apply({"params": params}, *args, method="tokens_to_logits"))
    positions = arange_positions(2, T)
    cached = decode(fn, llm_cfg, tokens, positions, np.ones_like(tokens), prefill=T - 4)
    assert max_err(cached, run(tokens, positions)[0]) <= TOL
  model = llama.Llama(llm_cfg, scan_layers=False)
  cache = kv_cache.init_cache(llm_cfg, batch, 32, jnp.float32, per_layer=True)
  one = jnp.ones((batch, 1), jnp.int32)
  step = jax.jit(lambda p, c: model.apply({"params": p}, one, one, one, c,
                                          method="tokens_to_logits"), donate_argnums=1)
  hlo = step.lower(llama.unstack_layers(params, llm_cfg.depth), cache).compile().as_text()
  n, k = llm_cfg.kv_heads, llm_cfg.head_dim
  shapes = (f"f32[{batch * n},32,{k}]", f"f32[{batch},{n},32,{k}]", f"f32[{batch},32,{n},{k}]")
  copies = []
  for line in hlo.splitlines():
    name, _, rest = line.strip().partition(" = ")  # rest: "shape{layout} opcode(operands)..."
    if rest.startswith(shapes) and re.search(r"transpose|copy", name + rest.split("(")[0]):
      copies.append(line)
  assert not copies, copies


def test_conversion_round_trip(params, hf_model, llm_cfg):
  back = dict(mapping.params_to_torch(jax.device_get(params), llama_table(llm_cfg)))
  state = hf_model.state_dict()
  assert sorted(back) == sorted(state)
  for name, tensor in state.items():
    np.testing.assert_array_equal(back[name], tensor.numpy(), err_msg=name)


def test_param_logical_axes(llm_cfg):
  specs = nn.get_partition_spec(init_shapes(llama.Llama(llm_cfg)))["params"]
  specs = jax.tree_util.tree_map(tuple, specs,
                                 is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert specs["embed"]["embedding"] == ("vocab", "embed")
  assert specs["lm_head"]["kernel"] == ("embed", "vocab")
  assert specs["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads")
  assert specs["layers"]["attn"]["k"]["kernel"] == ("layers", "embed", "kv_heads")
  assert specs["layers"]["attn"]["o"]["kernel"] == ("layers", "heads", "embed")
  assert specs["layers"]["mlp"]["down"]["kernel"] == ("layers", "mlp", "embed")


def test_config_reading_both_spellings(llm_cfg):
  old = llama_config_from_hf(hf_config_dict(new_spelling=False))
  assert old.to_dict() == llm_cfg.to_dict()
  assert llm_cfg.rope_theta == 500000.0 and llm_cfg.head_dim == 16 and llm_cfg.kv_heads == 2
  assert llm_cfg.rope_scaling.to_dict() == ROPE_LLAMA3
  # What transformers 5 itself writes parses to the same config.
  written = transformers.LlamaConfig(**hf_config_dict(new_spelling=True)).to_dict()
  assert llama_config_from_hf(written).to_dict() == llm_cfg.to_dict()
  plain = dict(hf_config_dict(new_spelling=False), rope_scaling=None, torch_dtype="bfloat16")
  plain_cfg = llama_config_from_hf(plain)
  assert plain_cfg.rope_scaling is None and plain_cfg.param_dtype == "bfloat16"
  assert llama_config_from_hf(plain, param_dtype="float32").param_dtype == "float32"


@pytest.mark.parametrize("field,value", [("attention_bias", True), ("mlp_bias", True),
                                         ("hidden_act", "gelu"), ("tie_word_embeddings", True),
                                         ("rope_scaling", dict(rope_type="yarn", factor=2.0))])
def test_config_reading_rejects_unsupported(field, value):
  with pytest.raises(ValueError, match=field if field != "rope_scaling" else "yarn"):
    llama_config_from_hf(dict(hf_config_dict(new_spelling=False), **{field: value}))


def test_tied_embeddings_by_copy():
  tied = dict(hf_config_dict(new_spelling=False), tie_word_embeddings=True)
  assert llama_config_from_hf(tied, allow_tied=True).vocab_size == 256
  embed = np.arange(6.0).reshape(3, 2)
  out = dict(tie_lm_head([("model.embed_tokens.weight", embed), ("model.norm.weight", 1)]))
  assert out["lm_head.weight"] is embed
  own_head = np.ones((3, 2))
  out = dict(tie_lm_head([("model.embed_tokens.weight", embed), ("lm_head.weight", own_head)]))
  assert out["lm_head.weight"] is own_head


def test_param_count_of_released_config_equals_hf():
  cfg = infllava_8b.llm_config()
  shapes = init_shapes(llama.Llama(cfg))
  ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes)))
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
      num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, tie_word_embeddings=False)
  with torch.device("meta"):
    theirs = sum(p.numel() for p in transformers.LlamaForCausalLM(hf_cfg).parameters())
  assert ours == theirs == 8_030_269_440


def test_remat_policies_give_equal_gradients(llm_cfg, params, tokens):
  positions = arange_positions(2, T)

  def grads(policy):
    model = llama.Llama(llm_cfg, remat_policy=policy)

    def loss(p):
      logits, _ = model.apply({"params": p}, tokens, positions, method="tokens_to_logits")
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return jax.jit(jax.grad(loss))(params)

  plain, remat = grads("none"), grads("nothing_saveable")
  errs = jax.tree_util.tree_map(max_err, plain, remat)
  assert max(jax.tree_util.tree_leaves(errs)) <= 1e-6
  assert float(jnp.max(jnp.abs(plain["layers"]["attn"]["q"]["kernel"]))) > 1e-3


def test_mlp_column_sets_equal_the_whole_mlp(llm_cfg, params, run, tokens):
  """`mlp_chunks` (the MLP width in column sets, one at a time) computes the same logits
  and gradients, with and without remat; with a cache (decoding) the MLP runs whole."""
  positions = arange_positions(2, T)
  chunked = llama.Llama(llm_cfg, mlp_chunks=4)
  logits, _ = chunked.apply({"params": params}, tokens, positions, method="tokens_to_logits")
  assert max_err(logits, run(tokens, positions)[0]) <= TOL
  cache = kv_cache.init_cache(llm_cfg, 2, T, jnp.float32)
  with_cache = lambda model: str(jax.make_jaxpr(
      lambda: model.apply({"params": params}, tokens, positions, np.ones_like(tokens), cache,
                          method="tokens_to_logits"))())
  assert with_cache(chunked) == with_cache(llama.Llama(llm_cfg))

  def grads(policy, chunks):
    model = llama.Llama(llm_cfg, remat_policy=policy, mlp_chunks=chunks)

    def loss(p):
      logits, _ = model.apply({"params": p}, tokens, positions, method="tokens_to_logits")
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return jax.jit(jax.grad(loss))(params)

  want = grads("none", 1)
  assert float(jnp.max(jnp.abs(want["layers"]["mlp"]["gate"]["kernel"]))) > 1e-4
  for policy in ("none", "nothing_saveable"):
    errs = jax.tree_util.tree_map(max_err, grads(policy, 4), want)
    assert max(jax.tree_util.tree_leaves(errs)) <= 1e-6
  with pytest.raises(ValueError, match=r"mlp_chunks=3 x 1 shards of the MLP width does not "
                     r"divide it \(128\)"):
    llama.Llama(llm_cfg, mlp_chunks=3).apply({"params": params}, tokens, positions,
                                             method="tokens_to_logits")


def test_mlp_column_sets_take_a_slice_of_every_shard_block():
  """Set c of 2 takes the c-th half of each of the 2 shard blocks of F = 8: columns of a
  [D, F] kernel, rows of an [F, D] one."""
  kernel = np.arange(2 * 8).reshape(2, 8)
  got = llama.mlp_column_set(jnp.asarray(kernel), 1, sets=2, shards=2, axis=1)
  np.testing.assert_array_equal(np.asarray(got), kernel[:, [2, 3, 6, 7]])
  got = llama.mlp_column_set(jnp.asarray(kernel.T), 1, sets=2, shards=2, axis=0)
  np.testing.assert_array_equal(np.asarray(got), kernel.T[[2, 3, 6, 7]])


def test_mlp_column_sets_on_a_tensor_mesh_equal_one_device(llm_cfg, params, run, tokens):
  """On fsdp=4 x tensor=2 (the MLP width split over `tensor`, so each set is cut from both
  shard blocks: `mlp_column_set`), the logits equal one device's."""
  from infllava_jax import sharding
  positions = arange_positions(2, T)
  mesh = sharding.make_mesh("fsdp=4,tensor=2")
  model = llama.Llama(llm_cfg, mlp_chunks=4)
  boxed = init_shapes(model)
  placed = jax.device_put(params, nn.meta.unbox(sharding.param_shardings(boxed, mesh))["params"])
  with jax.set_mesh(mesh), sharding.axis_rules():
    assert sharding.logical_axis_size("mlp") == 2
    logits, _ = jax.jit(lambda p: model.apply({"params": p}, tokens, positions,
                                              method="tokens_to_logits"))(placed)
  assert max_err(logits, run(tokens, positions)[0]) <= TOL


def test_attention_runs_on_local_shards_of_a_tensor_mesh(llm_cfg, params):
  """On fsdp=4 x tensor=2 (rows split over fsdp, KV heads over tensor) the attention products
  of a train step run on each device's own rows and heads: the compiled gradient all-gathers
  weights and [rows, T, D] activations, nothing of rank 4 or more (q, k, v, scores). Merging
  rows and heads into one batch axis for the products made GSPMD gather those."""
  from infllava_jax import sharding
  mesh = sharding.make_mesh("fsdp=4,tensor=2")
  model = llama.Llama(llm_cfg, attention_chunk=4)  # the causal-chunk path too
  boxed = init_shapes(model)
  placed = jax.device_put(params, nn.meta.unbox(sharding.param_shardings(boxed, mesh))["params"])
  tokens = jax.device_put(np.zeros((8, T), np.int32), sharding.batch_sharding(mesh, 2))
  positions = arange_positions(8, T)

  def loss(p, tokens):
    logits, _ = model.apply({"params": p}, tokens, positions, method="tokens_to_logits")
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

  with jax.set_mesh(mesh), sharding.axis_rules():
    hlo = jax.jit(jax.grad(loss)).lower(placed, tokens).compile().as_text()
  gathered = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather(?:-start)?\(", hlo)
  assert gathered  # FSDP gathers the weights: the pattern finds them
  assert not [shape for shape in gathered if shape.count(",") >= 3], gathered


def test_unscanned_layers_equal_scanned(llm_cfg, params, run, tokens):
  """`scan_layers=False` (every layer in the HLO) computes what the scan does: logits,
  the KV cache, and gradients (under remat too); its param tree is the unstacked one."""
  model = llama.Llama(llm_cfg, scan_layers=False)
  flat = llama.unstack_layers(params, llm_cfg.depth)
  shapes = nn.meta.unbox(init_shapes(model)["params"])
  assert jax.tree_util.tree_structure(shapes) == jax.tree_util.tree_structure(flat)
  other = jax.jit(lambda *args: model.apply({"params": flat}, *args, method="tokens_to_logits"))
  positions = arange_positions(2, T)
  assert max_err(other(tokens, positions)[0], run(tokens, positions)[0]) <= TOL
  segments = np.ones_like(tokens)
  want = decode(run, llm_cfg, tokens, positions, segments, prefill=T - 4)
  for per_layer in (False, True):  # the stacked cache and the tuple of per-layer buffers
    assert max_err(decode(other, llm_cfg, tokens, positions, segments, prefill=T - 4,
                          per_layer=per_layer), want) <= TOL
  with pytest.raises(ValueError, match="scan_layers=False"):
    decode(run, llm_cfg, tokens, positions, segments, prefill=T - 4, per_layer=True)

  def grads(policy, scan):
    m = llama.Llama(llm_cfg, remat_policy=policy, scan_layers=scan)

    def loss(p):
      logits, _ = m.apply({"params": p}, tokens, positions, method="tokens_to_logits")
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    return jax.jit(jax.grad(loss))(params if scan else flat)

  want = llama.unstack_layers(grads("none", True), llm_cfg.depth)
  for policy in ("none", "nothing_saveable"):
    errs = jax.tree_util.tree_map(max_err, grads(policy, False), want)
    assert max(jax.tree_util.tree_leaves(errs)) <= 1e-6


def test_attention_gradients_match_autodiff(llm_cfg, params, tokens):
  """The written-out VJP of `softmax_attention` (chunked, plain causal and packed) gives
  the gradients that autodiff of `jax.nn.dot_product_attention`'s XLA path gives."""

  def grads(impl, chunk, positions, segments, rows):
    model = llama.Llama(llm_cfg, attention_impl=impl, attention_chunk=chunk)

    def loss(p):
      logits, _ = model.apply({"params": p}, tokens[:rows], positions, segments,
                              method="tokens_to_logits")
      return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + jnp.mean(logits[..., :7] ** 2)

    return jax.jit(jax.grad(loss))(params)

  packed = packed_inputs((10, 10), T)
  for positions, segments, rows in ((arange_positions(2, T), None, 2), (*packed, 1)):
    want = grads("xla", 0, positions, segments, rows)
    for chunk in (0, 10):
      errs = jax.tree_util.tree_map(max_err, grads(None, chunk, positions, segments, rows), want)
      assert max(jax.tree_util.tree_leaves(errs)) <= 1e-5, (chunk, segments is None)
