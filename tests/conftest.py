"""Test-wide setup: 8 simulated CPU devices (set before jax is imported) and float32 matmuls."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Parity tests compare float32 results at 1e-5: never let XLA use reduced-precision passes.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_config():
  from infllava_jax.config import load_config
  return load_config("configs/tiny.py")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_config):
  """A converted checkpoint folder of the tiny config with random params, for the commands."""
  from infllava_jax.checkpoints import converted
  from tests.random_params import random_params
  path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
  converted.save_converted(path, tiny_config.model, random_params(tiny_config.model))
  return path
