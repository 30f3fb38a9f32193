"""Stage 2 (instruction tuning) of the released INF-LLaVA-8B: DEM + projector + the whole LLM.

  infllava train --config infllava_8b_stage2 --workdir runs/stage2 \\
      --init_base ckpt/base --init_from runs/stage1 --config.data.json_path=... \\
      --config.data.image_folder=... --config.data.tokenizer_path=...

ckpt/base is stage 1's converted LLaMA-3-8B-Instruct + CLIP (see infllava_8b_stage1.py):
every param comes from it first (the LLM fresh again, as the reference's, read in float32
since it trains here); then `train.init_include` takes the DEM and the projector from the
stage-1 run's latest step (the reference's `--pretrain_mm_mlp_adapter mm_projector.bin`,
docs/fidelity.md#stage-init). The run prints which module came from where. Memory check without a GPU:
`infllava compile --config infllava_8b_stage2 --mesh fsdp=8` (`infllava_8b_stage2:s2`: the S2
variant, `:llava` the LLaVA-1.5 baseline, on the same recipe).
"""

from ml_collections import ConfigDict, config_dict

from infllava_jax import sharding
from infllava_jax.presets import _sections, infllava_8b, synthetic


def model_config(variant: str = "infllava") -> ConfigDict:
  model = infllava_8b.model_config(variant)
  model.dtype = "bfloat16"           # compute dtype (the reference trains in bf16)
  # CLIP stays frozen: bf16 params are its released weights exactly, at half the memory.
  # The LLM trains, so it keeps float32 params (the master copy AdamW updates).
  model.vision.param_dtype = "bfloat16"
  model.llm.param_dtype = "float32"
  # Only the per-layer carry is kept for the backward pass; the forward is recomputed.
  # Saving the matmul outputs would leave room for only a few rows per device beside the
  # params, grads and AdamW state (docs/performance.md#sizing-behind-the-8b-configs).
  model.remat_policy = "nothing_saveable"
  # The MLP in 8 column sets of 1792, one at a time (llama.swiglu): no whole [2048, 14336]
  # activation, and FSDP gathers an eighth of a layer's MLP weights at a time
  # (docs/performance.md#fitting-the-8b-model).
  model.mlp_chunks = 8
  return model


def data_config() -> ConfigDict:
  data = synthetic.data_config()
  data.update(dict(
      # Either the LLaVA JSON + image folder below (every host reads the images from its own
      # copy), or ArrayRecord shards packed once (layout: infllava_jax/data/pack.py):
      #   infllava data pack --json llava_v1_5_mix665k.json --images images/ \
      #       --out gs://BUCKET/llava_v1_5_mix665k --shards 256 --skip-bad
      # read with --config.data.source=array_record --config.data.path=gs://BUCKET/...
      # (each process reads only its share of the records).
      source="llava_json",
      # LLaVA-Instruct mix (liuhaotian/LLaVA-Instruct-150K) with the images of coco, gqa,
      # ocr_vqa, textvqa and vg under one folder, as LLaVA-1.5's README lays them out.
      json_path="/path/to/LLaVA-Instruct/llava_v1_5_mix665k.json",
      image_folder="/path/to/LLaVA-Instruct/images",
      # The Meta-Llama-3-8B-Instruct tokenizer folder with the added <pad> (vocab 128257).
      tokenizer_path="/path/to/Meta-Llama-3-8B-Instruct",
      template="llama3",
      image_aspect="pad",    # expand to square with the mean colour, then resize (docs/fidelity.md#aspect-ratio)
      max_length=2048,
      packing=False,         # one sample per row, as the reference (batch = 128 samples)
      max_images_per_row=1,
      skip_bad_samples=True,  # skipped records are counted in the progress lines
      # Each global batch all-image or all-text, as the reference's group_by_modality_length
      # (the mix holds text-only ShareGPT samples).
      group_by_modality=True,
      # Rows per process: train.global_batch_size (128) / the number of processes.
      batch_size=config_dict.placeholder(int),
      worker_count=4,        # the reference's dataloader_num_workers
  ))
  return data


def train_config() -> ConfigDict:
  train = _sections.train_config(2)  # + LLM, lr 2e-5, AdamW 0.9/0.999/1e-8, wd 0,
  # 3% warmup + cosine, no clipping, global batch 128, 1 epoch (docs/fidelity.md#recipe-numbers)
  train.update(dict(
      # 128 rows over 8 devices in 4 micro-batches: 4 rows of 2048 tokens per device at once.
      grad_accum_steps=4,
      # The vocabulary-parallel loss (train.loss_chunk 512 tokens per row at a time): here
      # it holds less than stage 1's blockwise loss, and moves less
      # (docs/performance.md#what-lowered-the-peak).
      steps=config_dict.placeholder(int),  # None: num_epochs over the data (~5,198 steps)
      log_every=10,
      seed=0,
      # With --init_from the stage-1 run: only its trained modules (its LLM and CLIP are
      # ckpt/base's unchanged, frozen in stage 1, and stored in bf16).
      init_include=(r"^dem/", r"^projector/"),
  ))
  return train


def get_config(arg: str = "") -> ConfigDict:
  """`arg`: the model variant ("infllava" by default; "llava" or "s2": the same recipe, no DEM)."""
  config = ConfigDict()
  config.model = model_config(arg or "infllava")
  config.data = data_config()
  config.train = train_config()
  if config.model.variant != "infllava":  # nothing of a DEM to train or take from stage 1
    config.train.trainable = tuple(p for p in config.train.trainable if p != r"^dem/")
    config.train.init_include = (r"^projector/",)
  config.checkpoint = _sections.checkpoint_config()
  config.checkpoint.every_steps = 1000  # ~5,198 steps
  # A step holds float32 params and AdamW moments: ~96 GB for 8B. Keep two.
  config.checkpoint.max_to_keep = 2
  config.mesh = "fsdp"   # ZeRO-3 style over all devices, as the reference's ZeRO-3
  config.sharding = sharding.default_config()  # logical axis -> mesh axes rules
  return config
