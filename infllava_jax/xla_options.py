"""XLA compiler options for our jitted entry points, per platform (`jax.jit(compiler_options=)`).

On CPU, jaxlib 0.10's XLA hands dots, and the element-wise work around them, to YNNPACK
fusions; two of those (attention fused whole, products of a few rows) are slow on the CPUs
we measured. With the fusions off XLA:CPU runs dots through Eigen instead, so the train
step, `infllava compile` and the decode loop compile with them off on CPU; GPU and TPU
compiles get nothing from here. Figures: docs/performance.md#xlacpu-and-ynnpack.

A user who sets the same flag in `XLA_FLAGS` (before jax is imported) keeps their value:
we then pass nothing, and XLA reads the environment as usual.
"""

from __future__ import annotations

import os

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# An empty set of fusion types: no YNNPACK fusions (the flag exists in jaxlib 0.10, which
# pyproject.toml pins; tests/test_xla_options.py fails if a new jaxlib drops it).
CPU_OPTIONS = {YNN_FUSION_FLAG: ""}


def compiler_options(platform: str) -> dict[str, str]:
  """The options for a compile on `platform` ("cpu", "gpu", "tpu"): {} unless CPU, and {} where
  the user's `XLA_FLAGS` already sets the YNNPACK flag."""
  if platform != "cpu" or YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
    return {}
  return dict(CPU_OPTIONS)
