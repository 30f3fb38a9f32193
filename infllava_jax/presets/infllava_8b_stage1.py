"""Stage 1 (alignment) of the released INF-LLaVA-8B: DEM + projector trained on LAION/CC/SBU captions.

  infllava convert from-pytorch --llama Meta-Llama-3-8B-Instruct/ \\
      --clip clip-vit-large-patch14-336/ --out ckpt/base
  infllava train --config infllava_8b_stage1 --workdir runs/stage1 \\
      --init_base ckpt/base --config.data.json_path=... --config.data.image_folder=... \\
      --config.data.tokenizer_path=...

ckpt/base (base = converted LLaMA-3-8B-Instruct, + <pad> row, and CLIP-ViT-L/14-336) also
holds a DEM and projector initialised as PyTorch's defaults (docs/fidelity.md#module-init); `--init_base`
takes every param it holds, so the run starts as the reference's does (docs/fidelity.md#stage-init) and
trains the DEM and projector. Stage 2 starts from ckpt/base again plus this run's DEM +
projector. Memory check without a GPU:
`infllava compile --config infllava_8b_stage1 --mesh fsdp=8`.
"""

from ml_collections import ConfigDict, config_dict

from infllava_jax import sharding
from infllava_jax.presets import _sections, infllava_8b, synthetic


def model_config() -> ConfigDict:
  model = infllava_8b.model_config("infllava")
  model.dtype = "bfloat16"           # compute dtype (the reference trains in bf16)
  # Frozen towers hold no optimiser state and no float32 master copy is needed: CLIP and
  # LLaMA-3 are released in bf16, so bf16 params are the exact weights and halve their
  # memory. Matmuls run in bf16 either way.
  model.vision.param_dtype = "bfloat16"
  model.llm.param_dtype = "bfloat16"
  # Only the per-layer carry is kept for the backward pass; the LLM forward is recomputed.
  # Saving the matmul outputs ("dots_with_no_batch_dims_saveable") would cost too much at
  # the reference's 4+ rows per device (docs/performance.md#sizing-behind-the-8b-configs).
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
      #   infllava data pack --json blip_laion_cc_sbu_558k.json --images images/ \
      #       --out gs://BUCKET/blip_laion_cc_sbu_558k --shards 256 --skip-bad --template plain
      # read with --config.data.source=array_record --config.data.path=gs://BUCKET/...
      # (each process reads only its share of the records).
      source="llava_json",
      # LLaVA-Pretrain (liuhaotian/LLaVA-Pretrain): the JSON and its unzipped images/.
      json_path="/path/to/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json",
      image_folder="/path/to/LLaVA-Pretrain/images",
      # The Meta-Llama-3-8B-Instruct tokenizer folder with the added <pad> (vocab 128257).
      tokenizer_path="/path/to/Meta-Llama-3-8B-Instruct",
      template="plain",      # <image> + caption, loss on the caption (docs/fidelity.md#plain-template)
      image_aspect="square",  # resize + centre crop, as the reference's pretraining
      max_length=2048,
      packing=False,         # one sample per row, as the reference (batch = 256 samples)
      max_images_per_row=1,
      # A corrupt or missing image of 558K is skipped and counted in the progress lines
      # rather than stopping a multi-hour run.
      skip_bad_samples=True,
      group_by_modality=False,  # every record has an image
      # Rows per process: train.global_batch_size (256) / the number of processes.
      batch_size=config_dict.placeholder(int),
      worker_count=4,        # the reference's dataloader_num_workers
  ))
  return data


def train_config() -> ConfigDict:
  train = _sections.train_config(1)  # DEM + projector, lr 1e-3, AdamW 0.9/0.999/1e-8,
  # wd 0, 3% warmup + cosine, no clipping, global batch 256, 1 epoch (docs/fidelity.md#recipe-numbers)
  train.update(dict(
      # 256 rows over 8 devices in 8 micro-batches: 4 rows of 2048 tokens per device at once.
      grad_accum_steps=8,
      # The loss on each device's own rows, lm_head gathered 2048 vocabulary columns at a
      # time (optim.blockwise_cross_entropy): float32 logits [4, 2048, 2048] per device, and
      # no re-split copy of lm_head (docs/performance.md#what-lowered-the-peak).
      loss_vocab_block=2048,
      # Used instead on a mesh with tensor > 1 (vocabulary-parallel): tokens per row in each
      # loss chunk, 4 rows x 128 = 512 tokens of logits per device at a time.
      loss_chunk=128,
      steps=config_dict.placeholder(int),  # None: num_epochs over the data (~2,180 steps)
      log_every=10,
      seed=0,
      # Used only with --init_from (the command above uses --init_base, which takes all
      # ckpt/base holds): from a converted checkpoint, take CLIP and the LLM only, the DEM
      # and projector keeping this model's random init (train.seed).
      init_include=(r"^vision/", r"^llm/"),
  ))
  return train


def get_config(arg: str = "") -> ConfigDict:
  del arg
  config = ConfigDict()
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  config.checkpoint = _sections.checkpoint_config()
  config.checkpoint.every_steps = 500   # ~2,180 steps: a few restart points
  config.checkpoint.max_to_keep = 2     # each step holds the frozen LLM too (~17 GB)
  config.mesh = "fsdp"   # ZeRO-3 style over all devices (the reference: ZeRO-2 on 8 GPUs)
  config.sharding = sharding.default_config()  # logical axis -> mesh axes rules
  return config
