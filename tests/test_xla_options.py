"""The CPU compile options: which platforms get them, that the user's XLA_FLAGS win, and that
the installed jaxlib knows the flag and compiles dots without YNNPACK fusions under it."""

import jax
import jax.numpy as jnp
import pytest

from infllava_jax import xla_options


def test_only_cpu_compiles_get_the_options(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_options.compiler_options("cpu") == {xla_options.YNN_FUSION_FLAG: ""}
  assert xla_options.compiler_options("gpu") == {}
  assert xla_options.compiler_options("tpu") == {}


def test_the_users_xla_flags_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 "
                                  f"--{xla_options.YNN_FUSION_FLAG}=dot")
  assert xla_options.compiler_options("cpu") == {}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusions")
def test_installed_jaxlib_knows_and_applies_the_flag(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # so compiler_options gives the flag
  fn = lambda x, w: jax.nn.silu(x @ w)  # noqa: E731  (a few rows, as decoding at batch 8)
  args = (jax.ShapeDtypeStruct((8, 512), jnp.float32),
          jax.ShapeDtypeStruct((512, 1408), jnp.float32))
  default = jax.jit(fn).lower(*args).compile().as_text()
  ours = jax.jit(fn, compiler_options=xla_options.compiler_options("cpu")).lower(
      *args).compile().as_text()
  ynn = '"kind":"__ynn_fusion"'  # the fusion's backend config (names may carry the word too)
  assert ynn in default  # else the flag no longer matters: revisit the module
  assert ynn not in ours and " dot(" in ours
