"""Analytic FLOPs of a train step, for tokens/s -> MFU (model FLOPs utilisation).

Counted as multiply-adds x 2 over the matmuls (element-wise work is ignored):

  LLM      forward per row:  2 * N_llm * T  (weights; N_llm = matmul params incl. lm_head,
           embedding lookups are free)  +  2 * L * T^2 * H * K  (causal attention: QK^T
           and AV over half of the T x T scores).
  ViT      forward per image: views * (2 * N_vit * (P+1)  +  4 * L_vit * (P+1)^2 * D_vit)
           over its layers, + the patch embedding.
  projector: 2 * N * N_img per image, forward. The DEM is left out: its cross-attention
           is under 3% of the ViT's FLOPs at the released size.
  Backward, per part:
    trainable: 2x its forward (input and weight gradients);
    frozen LLM: it still passes gradients back to the projector's output: 1x the weight
      matmuls (input gradients only) and 2x the attention (the score and value products
      have no weights: their backward is the same whether the LLM trains or not);
    frozen ViT: nothing, since nothing upstream of it trains. A ViT with any trainable
      parameter is counted as training whole; its patch embedding has no input gradient.

So stage 1 (LLM frozen) costs ~2x the LLM forward, stage 2 ~3x, plus the ViT forward.
"""

from __future__ import annotations

from collections.abc import Iterable

from ml_collections import ConfigDict

from infllava_jax.model import infllava


def llm_matmul_params(llm: ConfigDict) -> int:
  d, hk, kvk = llm.width, llm.heads * llm.head_dim, llm.kv_heads * llm.head_dim
  block = d * hk * 2 + d * kvk * 2 + 3 * d * llm.mlp_dim
  return llm.depth * block + d * llm.vocab_size


def vit_forward_flops(model: ConfigDict) -> tuple[float, float]:
  """FLOPs of the vision tower on one image (all its views): (layers, patch embedding)."""
  v = model.vision
  tokens = (v.image_size // v.patch_size) ** 2 + 1
  layers = v.depth + 1 + v.feature_layer if v.feature_layer < 0 else v.feature_layer
  views = infllava.num_views(model)
  per_view = layers * (2 * (4 * v.width ** 2 + 2 * v.width * v.mlp_dim) * tokens
                       + 4 * tokens ** 2 * v.width)
  return views * per_view, views * 2 * v.patch_size ** 2 * 3 * v.width * tokens


def projector_forward_flops(model: ConfigDict, n_img: int) -> float:
  return 2 * n_img * (infllava.feature_width(model) * model.llm.width + model.llm.width ** 2)


def train_step_flops(model: ConfigDict, rows: int, length: int, images: int, n_img: int,
                     trainable_paths: Iterable[str]) -> float:
  """FLOPs of one optimiser step over `rows` rows of `length` tokens holding `images` images.

  trainable_paths: the trainable params' paths ("llm/...", "vision/...", see
  `optim.param_paths`); they say which parts have weight gradients.
  """
  paths = list(trainable_paths)
  llm = model.llm
  llm_weights = rows * 2 * llm_matmul_params(llm) * length
  llm_attention = rows * 2 * llm.depth * length ** 2 * llm.heads * llm.head_dim
  llm_trainable = any(p.startswith("llm/") for p in paths)
  vit_layers, vit_patches = vit_forward_flops(model)
  if any(p.startswith("vision/") for p in paths):
    vit = 3 * vit_layers + 2 * vit_patches
  else:
    vit = vit_layers + vit_patches
  return ((3 if llm_trainable else 2) * llm_weights + 3 * llm_attention
          + images * (vit + 3 * projector_forward_flops(model, n_img)))


# Dense bf16 peak per device, for MFU. Unknown kinds (CPU) report no MFU unless
# `train.peak_flops_per_device` is set.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,  # v5p's device_kind
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}
