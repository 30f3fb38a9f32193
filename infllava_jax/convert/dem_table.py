"""PyTorch `SpatialEmbed` (the DEM, docs/fidelity.md#shared-attention) -> `dem.DualPerspectiveEnhancement` params.

Names carry no prefix: the released checkpoints hold them under `model.spatial_embed.`, which
the caller adds with `mapping.prefixed(DEM_TABLE, "model.spatial_embed.", <param path>)`.
Note the naming trap (docs/fidelity.md#concat-order): `ffn_crop` acts on Lenh (our `mlp_local`) and
`ffn_stride` on Genh (our `mlp_global`).
"""

from __future__ import annotations

from infllava_jax.convert.mapping import LINEAR, Rule, Table


def _linear(torch: str, path: str) -> Table:
  return (Rule(f"{torch}.weight", f"{path}/kernel", LINEAR), Rule(f"{torch}.bias", f"{path}/bias"))


def _norm(torch: str, path: str) -> Table:
  return (Rule(f"{torch}.weight", f"{path}/scale"), Rule(f"{torch}.bias", f"{path}/bias"))


DEM_TABLE: Table = (
    *_linear("attention.linears.0", "attention/q"),
    *_linear("attention.linears.1", "attention/k"),
    *_linear("attention.linears.2", "attention/v"),
    *_linear("attention.linears.3", "attention/o"),
    *_norm("attention.ln", "attention/norm"),
    *_linear("ffn_crop.0", "mlp_local/fc1"),
    *_linear("ffn_crop.2", "mlp_local/fc2"),
    *_linear("ffn_stride.0", "mlp_global/fc1"),
    *_linear("ffn_stride.2", "mlp_global/fc2"),
    *_norm("ln_fuse", "fuse_norm"),
)
