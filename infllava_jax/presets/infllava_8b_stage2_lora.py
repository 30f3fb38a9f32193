"""Stage 2 (instruction tuning) of INF-LLaVA-8B with LoRA, as the reference's `lora_enable`:
adapters of rank 64 (alpha 16, dropout 0.05) on every linear layer of the LLM's decoder,
the DEM and the projector trained in full at their own lr (mm_projector_lr 2e-5), CLIP and
the rest of the LLM frozen. The whole run fits one 24 GiB device at batch 1 x 2048
(`--config.train.lora.base_bits=4`: 16 GiB; README "Fitting the 8B model").

  infllava train --config infllava_8b_stage2_lora --workdir runs/stage2_lora \\
      --init_base ckpt/base --init_from runs/stage1 --config.data.json_path=... \\
      --config.data.image_folder=... --config.data.tokenizer_path=...

As `infllava_8b_stage2` otherwise (data, schedule, init sources). Memory check without a GPU:
`infllava compile --config infllava_8b_stage2_lora --mesh fsdp=1 --device-memory 24GiB`.
"""

from ml_collections import ConfigDict

from infllava_jax.presets import infllava_8b_stage2


def get_config(arg: str = "") -> ConfigDict:
  config = infllava_8b_stage2.get_config(arg)
  # The frozen LLM in bfloat16, the released weights at half the memory; the adapters are
  # float32 whatever the base (lora/provider.py), the master copy AdamW updates.
  config.model.llm.param_dtype = "bfloat16"
  # Adapters apply to whole products: the MLP is computed whole (at batch 1 x 2048 its
  # [2048, 14336] activation is 56 MiB).
  config.model.mlp_chunks = 1
  train = config.train
  train.lora.enabled = True          # rank 64, alpha 16, dropout 0.05 (the defaults)
  train.trainable = (r"^dem/", r"^projector/")  # + the adapters, under LoRA
  # LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh), which the released code
  # keeps: lr 2e-4 for the adapters, mm_projector_lr 2e-5 for the DEM and projector.
  train.lr = 2e-4
  train.projector_lr = 2e-5
  return config
