"""Config sections the presets share: what `training/optim.py` and `checkpoints/run.py` read,
with the reference's values. Kept with the presets (not with the code that reads them) so
that loading a preset imports no training code. Not a preset itself (its name starts with
`_`)."""

from ml_collections import ConfigDict, config_dict


def train_config(stage: int = 2) -> ConfigDict:
  """The `train` section that `training/optim.py` reads: the reference's recipe
  (docs/fidelity.md#recipe-numbers) for stage 1 (alignment) or 2 (SFT)."""
  if stage not in (1, 2):
    raise ValueError(f"train_config: stage must be 1 or 2, got {stage!r}")
  return ConfigDict(dict(
      lr=1e-3 if stage == 1 else 2e-5,
      warmup_ratio=0.03,
      weight_decay=0.0,
      weight_decay_exclude=(r"(^|/)bias$", r"(^|/)scale$"),
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      max_grad_norm=config_dict.placeholder(float),  # None: no clipping
      grad_accum_steps=1,
      trainable=(r"^dem/", r"^projector/") + (() if stage == 1 else (r"^llm/",)),
      param_groups=(),
      # The DEM's and the projector's peak lr (the reference's mm_projector_lr); None: lr.
      projector_lr=config_dict.placeholder(float),
      lora=lora_config(),
      # Every supervised token weighs the same, however the batch is split. The reference
      # averages per-micro-batch means instead (docs/fidelity.md#loss-normalisation), which
      # "micro_batch_mean" with these group sizes (its per-device micro-batches) reproduces,
      # up to its stage-2 sampler sorting each global batch by length before splitting it
      # (ours does not).
      loss_normalisation="global_token_mean",
      loss_group_size=16 if stage == 1 else 8,
      loss_chunk=512,
      loss_vocab_block=0,
      global_batch_size=256 if stage == 1 else 128,
      num_epochs=1,
      # FLOP/s per device for the MFU in the progress lines; None: the bf16 peak of a
      # known TPU or GPU (`flops.PEAK_FLOPS`), no MFU on others.
      peak_flops_per_device=config_dict.placeholder(float),
  ))


def lora_config() -> ConfigDict:
  """The `train.lora` section (`lora/provider.py`), off; its values the reference's
  `lora_enable` defaults (r 64, alpha 16, dropout 0.05, every linear layer of the LLM but
  the lm_head)."""
  return ConfigDict(dict(
      enabled=False,
      rank=64,
      alpha=16.0,
      dropout=0.05,
      # Module paths (a regex, matched whole) whose kernels get adapters: scanned layers
      # (training) or unrolled ones (`layers_<i>`, generation).
      targets=r"llm/layers(_\d+)?/(attn/(q|k|v|o)|mlp/(gate|up|down))",
      # None: the frozen base in its param dtype; 8 or 4: quantised (QLoRA).
      base_bits=config_dict.placeholder(int),
  ))


def checkpoint_config() -> ConfigDict:
  """The `checkpoint` section that `checkpoints.run.Checkpointer` reads."""
  return ConfigDict(dict(
      every_steps=1000,
      max_to_keep=3,
      async_save=True,
  ))
