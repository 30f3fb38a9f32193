"""DEM: recombination, the toy vector and invariances (docs/fidelity.md#test-vectors), reduced ==
literal, a PyTorch re-implementation of `SpatialEmbed` (docs/fidelity.md#attention-block, #fusion), ablations, param count."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import traverse_util

from infllava_jax.config import load_config
from infllava_jax.convert import mapping
from infllava_jax.convert.dem_table import DEM_TABLE
from infllava_jax.model import dcm, dem
from infllava_jax.model.infllava import num_image_tokens


def _config(width=64, patch_side=6, n=3, heads=4, **overrides):
  """Tiny model config with `n x n` grid of views of `patch_side^2` patches."""
  cfg = load_config("configs/tiny.py").model
  cfg.vision.width, cfg.vision.image_size = width, 14 * patch_side
  cfg.dcm.image_size = n * 14 * patch_side
  cfg.dem.heads = heads
  for field, value in overrides.items():
    section, name = field.split("__")
    cfg[section][name] = value
  return cfg


def _normal(shape, seed=0):
  """Standard normal float32 test data (numpy: no PRNG kernels to compile)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _module(cfg):
  return dem.DualPerspectiveEnhancement.from_config(cfg)


def _feats(cfg, batch=1, seed=0):
  """[B, V, P, D] random view features in the config's plan."""
  plan = dcm.plan(cfg)
  shape = (batch, plan.num_views, num_image_tokens(cfg), cfg.vision.width)
  return _normal(shape, seed)


def _as_plan(all_feats, cfg):
  """[B, 2S (+1), P, D] = F_loc, F_glob (, separate low) -> the views `cfg`'s plan expects."""
  plan = dcm.plan(cfg)
  s = plan.grid[0] * plan.grid[1]
  parts = [all_feats[:, :plan.num_local], all_feats[:, s + np.asarray(plan.global_phases, int)]]
  if plan.separate_low:
    parts.append(all_feats[:, 2 * s:])
  return jnp.concatenate(parts, axis=1)


# ----------------------------------------------------------------------------- recombination


def _recombination_feats(n):
  """Sub-feature k holds 10k + (2r + c) on a 2x2 grid: [1, S, 4, 1]."""
  k = np.arange(n * n)[:, None]
  return jnp.asarray((10 * k + np.arange(4)).reshape(1, n * n, 4, 1).astype(np.float32))


def _rows(maps):
  return np.asarray(maps[0, ..., 0]).astype(int).tolist()


def test_recombination_vector_n2():
  f = _recombination_feats(2)
  assert _rows(dem.combine_local(f, (2, 2), (2, 2))) == [
      [0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]
  assert _rows(dem.combine_global(f, (2, 2), (2, 2))) == [
      [0, 10, 1, 11], [20, 30, 21, 31], [2, 12, 3, 13], [22, 32, 23, 33]]


def test_recombination_vector_n3():
  f = _recombination_feats(3)
  assert _rows(dem.combine_local(f, (3, 3), (2, 2))) == [
      [0, 1, 10, 11, 20, 21], [2, 3, 12, 13, 22, 23], [30, 31, 40, 41, 50, 51],
      [32, 33, 42, 43, 52, 53], [60, 61, 70, 71, 80, 81], [62, 63, 72, 73, 82, 83]]
  assert _rows(dem.combine_global(f, (3, 3), (2, 2))) == [
      [0, 10, 20, 1, 11, 21], [30, 40, 50, 31, 41, 51], [60, 70, 80, 61, 71, 81],
      [2, 12, 22, 3, 13, 23], [32, 42, 52, 33, 43, 53], [62, 72, 82, 63, 73, 83]]


@pytest.mark.parametrize("grid,patches", [((3, 3), (24, 24)), ((2, 2), (3, 3)), ((2, 3), (4, 5)),
                                          ((5, 3), (3, 2))])
def test_windows_invert_recombination(grid, patches):
  """Block_k(L) == F_loc[k] and Stride_k(G) == F_glob[k] (docs/fidelity.md#recombination), also on non-square grids."""
  n_h, n_w = grid
  f = _normal((2, n_h * n_w, patches[0] * patches[1], 3))

  @jax.jit
  def maps_and_windows(f):
    local, glob = dem.combine_local(f, grid, patches), dem.combine_global(f, grid, patches)
    return local, glob, dem.block_windows(local, grid), dem.stride_windows(glob, grid)

  local, glob, blocks, strides = map(np.asarray, maps_and_windows(f))
  f = np.asarray(f)
  assert local.shape == glob.shape == (2, n_h * patches[0], n_w * patches[1], 3)
  np.testing.assert_array_equal(blocks, f)
  np.testing.assert_array_equal(strides, f)
  for k in range(n_h * n_w):  # the slicing definitions (docs/fidelity.md#recombination)
    a, b = divmod(k, n_w)
    block = local[:, patches[0] * a:patches[0] * (a + 1), patches[1] * b:patches[1] * (b + 1)]
    np.testing.assert_array_equal(block.reshape(f[:, k].shape), f[:, k])
    np.testing.assert_array_equal(glob[:, a::n_h, b::n_w].reshape(f[:, k].shape), f[:, k])


def test_reduction_methods():
  maps = _normal((2, 72, 72, 4), seed=1)
  picked = dem.reduce_tokens(maps, (24, 24), "bilinear")
  np.testing.assert_array_equal(picked, maps[:, 1::3, 1::3].reshape(2, 576, 4))
  pooled = dem.reduce_tokens(maps, (24, 24), "avg")
  mean = np.asarray(maps).reshape(2, 24, 3, 24, 3, 4).mean((2, 4)).reshape(2, 576, 4)
  np.testing.assert_allclose(pooled, mean, atol=1e-6)


def test_reduced_index_released_layout():
  """3x3 grid of 24x24: 9 groups of 64 queries (docs/fidelity.md#unused-global-crops); 5x5 grid: uneven blocks, padded."""
  local, group, slot = dem.reduced_index((3, 3), (24, 24))
  assert group.shape == (9, 64) and sorted(slot.tolist()) == list(range(576))
  i, j = 10, 17  # R = 31, C = 52 -> block k = 3*1 + 2 = 5, position (7, 4) in it
  t = 24 * i + j
  assert local[t] == 5 * 576 + 7 * 24 + 4 and slot[t] // 64 == 5
  assert group.ravel()[slot[t]] == t
  _, group5, slot5 = dem.reduced_index((5, 5), (24, 24))
  assert group5.shape == (25, 25) and np.all(group5.ravel()[slot5] == np.arange(576))


# ----------------------------------------------------------------------------- the DEM toy vector (docs/fidelity.md#test-vectors)


def _toy_torch_params(d=32, hidden=2, out=16):
  """The PyTorch-named parameters of the toy vector, in its order p = 0..19."""
  linear = lambda n_out, n_in: [(n_out, n_in), (n_out,)]
  shapes = [("attention.linears.%d" % i, linear(d, d)) for i in range(4)]
  shapes += [("attention.ln", [(d,), (d,)])]
  shapes += [("ffn_crop.0", linear(hidden, d)), ("ffn_crop.2", linear(out, hidden)),
             ("ffn_stride.0", linear(hidden, d)), ("ffn_stride.2", linear(out, hidden)),
             ("ln_fuse", [(d,), (d,)])]
  tensors, p = [], 0
  for name, (w_shape, b_shape) in shapes:
    is_norm = name.endswith("ln") or name == "ln_fuse"
    i = np.arange(np.prod(w_shape), dtype=np.float64).reshape(w_shape)
    if is_norm:
      weight = 1 + 0.1 * np.sin(0.29 * i + p)
    else:
      weight = np.sin(0.37 * i + p) / math.sqrt(w_shape[-1])
    tensors.append((f"{name}.weight", weight))
    i = np.arange(b_shape[0], dtype=np.float64)
    bias = 0.05 * np.cos(0.41 * i + p + 1) if is_norm else 0.1 * np.cos(0.53 * i + p + 1)
    tensors.append((f"{name}.bias", bias))
    p += 2
  return tensors


def _toy_feats():
  """18 sub-features [1, 576, 32]: F[k][0, t, c] = sin(0.05 t + 0.3 c + 0.7 k)."""
  k, t, c = np.meshgrid(np.arange(18), np.arange(576), np.arange(32), indexing="ij")
  return jnp.asarray(np.sin(0.05 * t + 0.3 * c + 0.7 * k)[None].astype(np.float32))


def _load(module, feats, tensors):
  expected = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), feats))["params"]
  params = mapping.torch_to_params(((n, t.astype(np.float32)) for n, t in tensors), DEM_TABLE,
                                   expected, source="test tensors")
  return {"params": params}


@pytest.mark.parametrize("reduced", [False, True])
def test_dem_toy_vector(reduced):
  cfg = _config(width=32, patch_side=24, heads=8, dem__merge="none", dem__reduced_path=reduced)
  module = _module(cfg)
  assert module.plan.reduced == reduced
  all_feats = _toy_feats()
  feats = _as_plan(all_feats, cfg)
  variables = _load(module, feats, _toy_torch_params())
  out = jax.jit(module.apply)(variables, feats)
  assert out.shape == (1, 576, 32)
  close = lambda got, want: np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  close(out[0, 0, 0:4], [0.320536, 0.119191, 0.103970, 0.189359])
  close(out[0, 300, 10:14], [0.725049, 0.139772, -0.394684, -0.800314])
  close(out[0, 575, 28:32], [-0.804664, -0.601503, -0.267784, -0.098291])
  # Sums over 18432 float32 values: 1e-5 relative to the summed magnitude (the brief's rule).
  np.testing.assert_allclose(float(jnp.sum(out)), 203.1535, atol=1e-5 * 15251.7208, rtol=0)
  np.testing.assert_allclose(float(jnp.sum(jnp.abs(out))), 15251.7208, rtol=1e-5)
  if reduced:
    return

  @jax.jit
  def intermediates(variables, all_feats):
    f_loc, f_glob = all_feats[:, :9], all_feats[:, 9:]
    local = dem.combine_local(f_loc, (3, 3), (24, 24))
    glob = dem.combine_global(f_glob, (3, 3), (24, 24))
    attend = lambda q, kv: module.apply(variables, q, kv,
                                        method=lambda m, q, kv: m.attention(q, kv))
    a_0 = attend(dem.block_windows(glob, (3, 3))[:, 0], f_loc[:, 0])
    b_4 = attend(dem.stride_windows(local, (3, 3))[:, 4], f_glob[:, 4])
    return local, glob, a_0, b_4

  local, glob, a_0, b_4 = intermediates(variables, all_feats)
  close(local[0, 1, 1, 0:4], [0.948985, 0.999784, 0.961275, 0.836899])
  close(glob[0, 1, 1, 0:4], [0.319098, 0.024775, -0.271761, -0.544021])
  close(a_0[0, 0, 0:4], [-0.274963, -0.181722, 0.054824, 0.457863])
  close(b_4[0, 0, 0:4], [0.405172, 0.162446, 0.316554, 0.738211])


# ----------------------------------------------------------------------------- invariances (docs/fidelity.md#unused-global-crops)


def _init(module, feats, seed=1):
  """Random PyTorch-style params from numpy (jit-compiling `init` costs seconds per config)."""
  rng = np.random.default_rng(seed)
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), feats))

  def fill(path, leaf):
    name = path[-1].key
    if name == "scale":
      return jnp.asarray(1 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    bound = 1 / math.sqrt(leaf.shape[0]) if name == "kernel" else 0.1
    return jnp.asarray(rng.uniform(-bound, bound, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_only_local_crops_and_the_centre_phase_matter():
  cfg = _config(dem__reduced_path=False, dem__merge="none")
  module = _module(cfg)
  feats = _feats(cfg, batch=1)
  variables = _init(module, feats)
  apply = jax.jit(module.apply)
  noise = 5 * _normal(feats.shape, seed=7)
  others = np.ones(18, bool)
  others[:9] = others[13] = False  # global crops k != 4
  used = np.flatnonzero(~others)
  # One batch: the input, the input with every global crop k != 4 replaced, and one copy per
  # local crop / global crop 4 with only that view perturbed.
  batch = jnp.repeat(feats, 2 + used.size, axis=0)
  batch = batch.at[1, others].add(noise[0, others])
  batch = batch.at[2 + np.arange(used.size), used].add(noise[0, used])
  out = apply(variables, batch)
  np.testing.assert_array_equal(out[1], out[0])
  change = jnp.abs(out[2:] - out[:1]).max(axis=(1, 2))
  assert np.all(np.asarray(change) > 1e-3), change
  grad = jax.grad(lambda f: jnp.sum(apply(variables, f) ** 2))(feats)
  assert float(jnp.abs(grad[:, others]).max()) == 0.0
  assert np.all(np.asarray(jnp.abs(grad[0, used]).max(axis=(1, 2))) > 0)


def _check_reduced_equals_literal(literal_cfg, reduced_cfg, batch=1, seed=3):
  literal, reduced = _module(literal_cfg), _module(reduced_cfg)
  assert not literal.plan.reduced and reduced.plan.reduced
  all_feats = _feats(literal_cfg, batch=batch, seed=seed)
  variables = _init(literal, all_feats)
  want = jax.jit(literal.apply)(variables, all_feats)
  got = jax.jit(reduced.apply)(variables, _as_plan(all_feats, reduced_cfg))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  return got


@pytest.mark.parametrize("enhance,fusion", [("both", "concat"), ("global", "concat"),
                                            ("local", "add"), ("none", "add")])
def test_reduced_path_equals_literal_path(enhance, fusion):
  overrides = dict(dem__enhance=enhance, dem__fusion=fusion)
  _check_reduced_equals_literal(_config(dem__reduced_path=False, **overrides),
                                _config(dem__reduced_path=True, **overrides), batch=2)


def test_reduced_path_equals_literal_path_on_a_5x5_grid():
  """5x5 grid of 4x4 patches: the kept positions fall unevenly into blocks (padded groups)."""
  _check_reduced_equals_literal(_config(n=5, patch_side=4, dem__reduced_path=False),
                                _config(n=5, patch_side=4, dem__reduced_path=True))


def test_reduced_path_equals_literal_path_at_the_released_width():
  """Width 1024 with 8 heads of 128 (the released DEM), on 6x6-patch views to stay fast."""
  overrides = dict(width=1024, heads=8, patch_side=6)
  got = _check_reduced_equals_literal(_config(dem__reduced_path=False, **overrides),
                                      _config(dem__reduced_path=True, **overrides))
  assert got.shape == (1, 36, 1024)


# ----------------------------------------------------------------------------- PyTorch reference


class TorchMHA(torch.nn.Module):
  """The released attention block (docs/fidelity.md#attention-block), written from its equations."""

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.linears = torch.nn.ModuleList([torch.nn.Linear(d, d) for _ in range(4)])
    self.ln = torch.nn.LayerNorm(d, eps=1e-5)

  def forward(self, q, kv):
    b, t, d = q.shape
    d_k = d // self.heads
    split = lambda x: x.view(b, -1, self.heads, d_k).transpose(1, 2)
    queries, keys, values = (split(self.linears[0](q)), split(self.linears[1](kv)),
                             split(self.linears[2](kv)))
    attn = torch.softmax(queries @ keys.transpose(-2, -1) / math.sqrt(d_k), dim=-1)
    o = (attn @ values).transpose(1, 2).reshape(b, t, d)
    return self.ln(self.linears[3](o) + q)


class TorchSpatialEmbed(torch.nn.Module):
  """The released SpatialEmbed (docs/fidelity.md#recombination to #fusion) with explicit loops and slice assignments (an independent formulation)."""

  def __init__(self, d, heads, n, p, ratio=16):
    super().__init__()
    self.n, self.p = n, p
    self.attention = TorchMHA(d, heads)
    mlp = lambda: torch.nn.Sequential(torch.nn.Linear(d, d // ratio), torch.nn.GELU(),
                                      torch.nn.Linear(d // ratio, d // 2))
    self.ffn_crop, self.ffn_stride = mlp(), mlp()
    self.ln_fuse = torch.nn.LayerNorm(d, eps=1e-5)

  def forward(self, f_loc, f_glob):
    n, p = self.n, self.p
    b, _, d = f_loc[0].shape
    local, glob = torch.zeros(b, n * p, n * p, d), torch.zeros(b, n * p, n * p, d)
    local_enh, glob_enh = torch.zeros_like(local), torch.zeros_like(glob)
    for k in range(n * n):
      a, c = divmod(k, n)
      local[:, p * a:p * (a + 1), p * c:p * (c + 1)] = f_loc[k].view(b, p, p, d)
      glob[:, a::n, c::n] = f_glob[k].view(b, p, p, d)
    for k in range(n * n):
      a, c = divmod(k, n)
      block = (slice(None), slice(p * a, p * (a + 1)), slice(p * c, p * (c + 1)))
      glob_enh[block] = self.attention(glob[block].reshape(b, p * p, d), f_loc[k]).view(b, p, p, d)
      strided = local[:, a::n, c::n].reshape(b, p * p, d)
      local_enh[:, a::n, c::n] = self.attention(strided, f_glob[k]).view(b, p, p, d)
    z = self.ln_fuse(torch.cat([self.ffn_crop(local_enh), self.ffn_stride(glob_enh)], -1)
                     + glob_enh + local_enh)
    out = F.interpolate(z.permute(0, 3, 1, 2), size=(p, p), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(b, p * p, d)


@pytest.mark.parametrize("n,reduced", [(3, True), (2, False)])
def test_matches_a_pytorch_spatial_embed(n, reduced):
  """Random PyTorch weights through DEM_TABLE; output after the mean merge (docs/fidelity.md#resolution-merge)."""
  cfg = _config(n=n, dem__reduced_path=reduced)
  module = _module(cfg)
  assert module.plan.reduced == reduced
  torch.manual_seed(0)
  reference = TorchSpatialEmbed(64, 4, n, 6)
  s = n * n
  all_feats = np.asarray(_normal((2, 2 * s + 1, 36, 64), seed=8))
  views = [torch.from_numpy(all_feats[:, k]) for k in range(2 * s + 1)]
  with torch.no_grad():
    dem_out = reference(views[:s], views[s:2 * s]).numpy()
  low = all_feats[:, s + dcm.centre_phase((n, n))] if n % 2 else all_feats[:, 2 * s]
  want = 0.5 * (low + dem_out)
  state = [(name, t.numpy()) for name, t in reference.state_dict().items()]
  feats = _as_plan(jnp.asarray(all_feats), cfg)
  variables = _load(module, feats, state)
  got = jax.jit(module.apply)(variables, feats)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # And back: the table's inverse gives the PyTorch state dict unchanged.
  back = dict(mapping.params_to_torch(variables["params"], DEM_TABLE))
  assert sorted(back) == sorted(name for name, _ in state)
  for name, tensor in state:
    np.testing.assert_array_equal(back[name], tensor)


# ----------------------------------------------------------------------------- size, ablations


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_parameter_count_of_the_released_dem():
  cfg = load_config("configs/infllava_8b.py").model
  module = _module(cfg)
  assert module.plan.num_views == 10 and module.patches == (24, 24)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 10, 576, 1024), jnp.bfloat16))
  assert _count(nn.unbox(shapes)["params"]) == 4_400_256
  expected = traverse_util.flatten_dict(nn.unbox(shapes)["params"], sep="/")
  assert sorted(expected) == sorted(rule.path for rule in DEM_TABLE)


def _run(cfg, batch=2):
  """(param tree, out, feats) of the config's DEM with random params."""
  module = _module(cfg)
  feats = _feats(cfg, batch=batch, seed=9)
  variables = _init(module, feats)
  return variables.get("params", {}), jax.jit(module.apply)(variables, feats), feats


def test_init_is_pytorch_default():
  """Uniform(+-1/sqrt(fan_in)) Linear weights and biases, LayerNorm ones / zeros (docs/fidelity.md#module-init)."""
  cfg = _config()
  module = _module(cfg)
  params = nn.unbox(jax.jit(module.init)(jax.random.key(0), _feats(cfg)))["params"]
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    if path.endswith("norm/scale"):
      np.testing.assert_array_equal(leaf, 1)
    elif path.endswith("norm/bias"):
      np.testing.assert_array_equal(leaf, 0)
    else:
      fan_in = traverse_util.flatten_dict(params, sep="/")[path.rsplit("/", 1)[0] + "/kernel"].shape[0]
      bound = 1 / math.sqrt(fan_in)
      assert float(jnp.abs(leaf).max()) <= bound and float(jnp.abs(leaf).max()) > 0.5 * bound, path


@pytest.mark.parametrize("overrides,param_groups", [
    (dict(dem__fusion="add"), {"attention", "fuse_norm"}),
    (dict(dem__enhance="none"), {"mlp_local", "mlp_global", "fuse_norm"}),
    (dict(dem__enhance="none", dem__fusion="add"), {"fuse_norm"}),  # the paper's "w/ DCM"
    (dict(dcm__crops="local", dem__enhance="none"), set()),
    (dict(dem__reduction="avg"), {"attention", "mlp_local", "mlp_global", "fuse_norm"}),
    (dict(n=4), {"attention", "mlp_local", "mlp_global", "fuse_norm"}),  # 1344 / 336
])
def test_ablations_give_one_views_worth_of_tokens(overrides, param_groups):
  cfg = _config(**overrides)
  params, out, _ = _run(cfg)
  assert out.shape == (2, num_image_tokens(cfg), cfg.vision.width)
  assert set(params) == param_groups
  assert bool(jnp.all(jnp.isfinite(out)))


def test_llava_baseline_passes_the_single_view_through():
  cfg = load_config("configs/tiny.py:llava").model
  params, out, feats = _run(cfg)
  assert params == {} and dcm.num_views(cfg) == 1
  np.testing.assert_array_equal(out, feats[:, 0])


def test_single_perspective_crops_reduce_their_own_map():
  """crops="global": Z = G, whose bilinear pick is global crop 4; merge "add" doubles it."""
  cfg = _config(dcm__crops="global", dem__enhance="none", dem__merge="add")
  _, out, feats = _run(cfg)
  np.testing.assert_allclose(out, 2 * feats[:, 4], atol=1e-6)


def test_bfloat16_compute():
  cfg = _config()
  cfg.dtype = "bfloat16"
  out = jax.jit(_module(cfg).apply)(_init(_module(cfg), _feats(cfg)), _feats(cfg))
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 36, 64)


@pytest.mark.parametrize("overrides,message", [
    (dict(dem__fusion="mul"), r"model.dem.fusion='mul'; expected one of \['concat', 'add'\]"),
    (dict(dem__heads=3), r"model.dem.heads=3 does not divide model.vision.width=64"),
    (dict(dem__bottleneck_ratio=128), r"model.dem.bottleneck_ratio=128"),
    (dict(dem__layer_norm_eps=0.0), r"model.dem.layer_norm_eps=0.0"),
    (dict(dcm__crops="global"), r"model.dem.enhance='both' needs both perspectives"),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    _module(_config(**overrides))
