"""DCM: pixel index maps (paper eqs. 9-17), resampling against PyTorch (docs/fidelity.md#torch-resampling), views."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jax.numpy as jnp

from infllava_jax.config import load_config
from infllava_jax.model import dcm


def _image(height, width, channels=1):
  """[1, H, W, C] holding the flat pixel id r*W + c in every channel."""
  ids = np.arange(height * width, dtype=np.float32).reshape(1, height, width, 1)
  return jnp.asarray(np.repeat(ids, channels, axis=-1))


def _grid_lists(crops):
  return [np.asarray(crops[0, k, :, :, 0]).astype(int).tolist() for k in range(crops.shape[1])]


def _torch_resize(x, size, mode):
  """PyTorch reference on our channels-last layout."""
  t = torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)
  y = F.interpolate(t, size=size, mode=mode, align_corners=False)
  return y.permute(0, 2, 3, 1).numpy()


# ----------------------------------------------------------------------------- index maps


def test_index_vector_four_by_four_grid_of_two():
  image = _image(4, 4)
  assert _grid_lists(dcm.local_crops(image, (2, 2))) == [
      [[0, 1], [4, 5]], [[2, 3], [6, 7]], [[8, 9], [12, 13]], [[10, 11], [14, 15]]]
  assert _grid_lists(dcm.global_crops(image, (2, 2))) == [
      [[0, 2], [8, 10]], [[1, 3], [9, 11]], [[4, 6], [12, 14]], [[5, 7], [13, 15]]]


def test_index_vector_six_by_six_grid_of_three():
  image = _image(6, 6)
  assert _grid_lists(dcm.local_crops(image, (2, 2))) == [
      [[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10, 11]], [[12, 13], [18, 19]],
      [[14, 15], [20, 21]], [[16, 17], [22, 23]], [[24, 25], [30, 31]], [[26, 27], [32, 33]],
      [[28, 29], [34, 35]]]
  assert _grid_lists(dcm.global_crops(image, (2, 2))) == [
      [[0, 3], [18, 21]], [[1, 4], [19, 22]], [[2, 5], [20, 23]], [[6, 9], [24, 27]],
      [[7, 10], [25, 28]], [[8, 11], [26, 29]], [[12, 15], [30, 33]], [[13, 16], [31, 34]],
      [[14, 17], [32, 35]]]


@pytest.mark.parametrize("height,width,view", [
    (1008, 1008, (336, 336)),  # the released 3x3 grid
    (6, 12, (2, 3)),           # non-square grid 3x4 with non-square views
    (9, 8, (4, 3)),            # floor: the last row and the last 2 columns are dropped
    (10, 15, (5, 3)),          # 2x5
])
def test_index_maps_equal_the_gather_form(height, width, view):
  """Paper eqs. 11-17: local Y = h*(k//N_w) + y; global Y = N_h*y + k//N_w."""
  image = _image(height, width)
  n_h, n_w = height // view[0], width // view[1]
  assert dcm.grid_shape(height, width, view) == (n_h, n_w)
  y, x = np.meshgrid(np.arange(view[0]), np.arange(view[1]), indexing="ij")
  local, glob = np.asarray(dcm.local_crops(image, view)), np.asarray(dcm.global_crops(image, view))
  assert local.shape == glob.shape == (1, n_h * n_w, *view, 1)
  for k in range(n_h * n_w):
    row, col = divmod(k, n_w)
    np.testing.assert_array_equal(local[0, k, ..., 0],
                                  (view[0] * row + y) * width + view[1] * col + x)
    np.testing.assert_array_equal(glob[0, k, ..., 0], (n_h * y + row) * width + n_w * x + col)
  k = n_h * n_w - 1  # the single-phase slice agrees with the stack
  np.testing.assert_array_equal(dcm.global_crop(image, view, k), glob[:, k])


def test_centre_phase():
  assert dcm.centre_phase((3, 3)) == 4
  assert dcm.centre_phase((5, 3)) == 7
  with pytest.raises(ValueError, match="grid 2x3"):
    dcm.centre_phase((2, 3))


# ----------------------------------------------------------------------------- resampling


def test_bicubic_identities_at_the_released_size():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(1, 1008, 1008, 2)).astype(np.float32))
  low = dcm.resize(image, (336, 336), "bicubic")
  np.testing.assert_array_equal(low, image[:, 1::3, 1::3])
  np.testing.assert_array_equal(low, _torch_resize(image, (336, 336), "bicubic"))
  np.testing.assert_array_equal(dcm.resize(image, (1008, 1008), "bicubic"), image)
  # 336 -> 1008 -> 336 round trip (the 336-processor inference path, docs/fidelity.md#inference-resolution).
  up = dcm.resize(low, (1008, 1008), "bicubic")
  np.testing.assert_allclose(up, _torch_resize(low, (1008, 1008), "bicubic"), atol=1e-5)
  np.testing.assert_array_equal(dcm.resize(up, (336, 336), "bicubic"), low)


def test_bilinear_72_to_24_is_a_pick():
  rng = np.random.default_rng(1)
  maps = jnp.asarray(rng.normal(size=(2, 72, 72, 5)).astype(np.float32))
  out = dcm.resize(maps, (24, 24), "bilinear")
  np.testing.assert_array_equal(out, maps[:, 1::3, 1::3])
  np.testing.assert_array_equal(out, _torch_resize(maps, (24, 24), "bilinear"))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("in_hw,out_hw", [
    ((48, 48), (24, 24)),   # ratio 2 (672 -> 336 low-res; 48 -> 24 reduction)
    ((96, 96), (24, 24)),   # ratio 4
    ((60, 40), (12, 20)),   # ratios 5 and 2 on different axes
    ((24, 24), (72, 72)),   # up-sampling, ratio 1/3
    ((30, 17), (11, 13)),   # non-integer ratios
])
def test_resize_matches_torch(method, in_hw, out_hw):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, *in_hw, 3)).astype(np.float32))
  np.testing.assert_allclose(dcm.resize(x, out_hw, method), _torch_resize(x, out_hw, method),
                             atol=1e-6, rtol=0)


def test_even_ratio_bilinear_is_the_centre_mean():
  """Bilinear 48 -> 24 is a 2x2 mean (the paper's "average pooling" holds for ratio 2 only)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(1, 48, 48, 4)).astype(np.float32))
  mean = x.reshape(1, 24, 2, 24, 2, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(dcm.resize(x, (24, 24), "bilinear"), mean, atol=1e-6)


def test_resize_keeps_the_dtype_and_picks_bf16_exactly():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(1, 63, 63, 3)), jnp.bfloat16)
  out = dcm.resize(x, (21, 21), "bicubic")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, x[:, 1::3, 1::3])


# ----------------------------------------------------------------------------- views and plans


def _config(**overrides):
  cfg = load_config("configs/tiny.py").model
  for field, value in overrides.items():
    section, name = field.split("__")
    cfg[section][name] = value
  return cfg


def _pixels(cfg, batch=2, side=None):
  side = side or cfg.dcm.image_size
  rng = np.random.default_rng(5)
  return jnp.asarray(rng.normal(size=(batch, side, side, 3)).astype(np.float32))


def test_views_reduced_path_is_the_local_crops_and_the_centre_phase(tiny_config):
  cfg = tiny_config.model
  pixels = _pixels(cfg)
  plan = dcm.plan(cfg)
  assert (plan.reduced, plan.num_local, plan.global_phases, plan.low) == (True, 9, (4,), 9)
  out = dcm.views(pixels, cfg)
  assert out.shape == (2, 10, 84, 84, 3) and dcm.num_views(cfg) == 10
  np.testing.assert_array_equal(out[:, :9], dcm.local_crops(pixels, (84, 84)))
  np.testing.assert_array_equal(out[:, 9], pixels[:, 1::3, 1::3])


def test_views_literal_path_reuses_the_centre_phase_as_low_res():
  cfg = _config(dem__reduced_path=False)
  pixels = _pixels(cfg)
  plan = dcm.plan(cfg)
  assert (plan.num_views, plan.low, plan.separate_low) == (18, 13, False)
  out = dcm.views(pixels, cfg)
  np.testing.assert_array_equal(out[:, :9], dcm.local_crops(pixels, (84, 84)))
  np.testing.assert_array_equal(out[:, 9:], dcm.global_crops(pixels, (84, 84)))
  np.testing.assert_array_equal(out[:, plan.low], dcm.resize(pixels, (84, 84), "bicubic"))


def test_views_even_grid_adds_a_real_bicubic_low_res_view():
  cfg = _config(dcm__image_size=168)  # 2x2 grid: the reduced path does not apply
  pixels = _pixels(cfg)
  plan = dcm.plan(cfg)
  assert (plan.reduced, plan.num_views, plan.low, plan.separate_low) == (False, 9, 8, True)
  out = dcm.views(pixels, cfg)
  np.testing.assert_allclose(out[:, 8], _torch_resize(pixels, (84, 84), "bicubic"), atol=1e-6)


def test_views_upsample_a_smaller_input_first():
  """An 84-px (processor-size) input is bicubically resized to the model's 252 (docs/fidelity.md#inference-resolution)."""
  cfg = _config()
  small = _pixels(cfg, side=84)
  big = jnp.asarray(_torch_resize(small, (252, 252), "bicubic"))
  out = dcm.views(small, cfg)
  np.testing.assert_allclose(out, dcm.views(big, cfg), atol=1e-5)
  np.testing.assert_array_equal(out[:, 9], dcm.resize(out[:, 9], (84, 84), "bicubic"))


@pytest.mark.parametrize("overrides,num_views,low", [
    (dict(dcm__crops="local", dem__enhance="none"), 10, 9),   # 9 local + separate low-res
    (dict(dcm__crops="global", dem__enhance="none"), 9, 4),   # low-res = global crop 4
    (dict(dcm__crops="none", dem__enhance="none", dcm__image_size=84), 1, 0),
    (dict(dem__merge="none"), 10, None),                       # reduced, no low-res merge
    (dict(dem__merge="none", dem__reduced_path=False), 18, None),
    (dict(dem__reduction="avg"), 18, 13),                      # avg: no exact reduced path
    (dict(dcm__image_size=336), 33, 32),                       # 4x4 grid: 16 + 16 + 1
    (dict(dcm__image_size=420), 26, 25),                       # 5x5 grid, reduced
])
def test_view_counts_of_the_ablations(overrides, num_views, low):
  cfg = _config(**overrides)
  plan = dcm.plan(cfg)
  assert (plan.num_views, plan.low) == (num_views, low)
  out = dcm.views(_pixels(cfg, batch=1), cfg)
  assert out.shape == (1, num_views, 84, 84, 3)


def test_views_local_only_low_res_is_the_centre_phase():
  cfg = _config(dcm__crops="local", dem__enhance="none")
  pixels = _pixels(cfg)
  out = dcm.views(pixels, cfg)
  np.testing.assert_array_equal(out[:, 9], pixels[:, 1::3, 1::3])


@pytest.mark.parametrize("overrides,message", [
    (dict(dcm__crops="tiles"), r"model.dcm.crops='tiles'; expected one of \['dual'"),
    (dict(dem__enhance="all"), r"model.dem.enhance='all'"),
    (dict(dem__reduction="max"), r"model.dem.reduction='max'"),
    (dict(dem__merge="concat"), r"model.dem.merge='concat'"),
    (dict(dcm__image_size=200), r"model.dcm.image_size=200 is not a multiple"),
    (dict(dcm__crops="local"), r"model.dem.enhance='both' needs both perspectives"),
])
def test_config_errors_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=message):
    dcm.plan(_config(**overrides))
