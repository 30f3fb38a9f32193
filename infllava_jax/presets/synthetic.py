"""The embedded default run: the tiny model on the synthetic fine-detail set.

`get_config("infllava")` (high-res 3x3 DCM + DEM, 252 px input), `get_config("baseline")`
(alias "llava": the LLaVA-1.5 baseline, one 84 px view of the same images),
`get_config("anyres")` (alias "llava_next": LLaVA-NeXT's AnyRes, a grid of 84 px tiles chosen
per image plus a base view) or `get_config("s2")` (LLaVA-1.5 with S2: CLIP on 84, 168 and
252 px, 252 px input). All read the same records; the data pipeline resizes them to the
model's input size (AnyRes: tiles them, infllava_jax/data/anyres.py).
"""

from ml_collections import ConfigDict, config_dict

from infllava_jax import sharding
from infllava_jax.presets import _sections, tiny

# Size of the shipped tokenizer (infllava_jax/data/assets/tokenizer), <pad> included.
SHIPPED_VOCAB_SIZE = 512


def data_config() -> ConfigDict:
  return ConfigDict(dict(
      # Where records come from: "synthetic" (generated in-process), "llava_json"
      # (json_path + image_folder) or "tfds" (tfds_name: a registered name or a prepared
      # folder such as OUT/tfds/synthetic_detail/1.0.0 written by `infllava data synth`)
      # or "array_record" (path: a folder of shards written by `infllava data pack`).
      source="synthetic",
      json_path="",
      image_folder="",
      path="",
      tfds_name="",
      tfds_data_dir="",
      synthetic=ConfigDict(dict(
          num_train=20000,   # records of the train split (generated on access)
          num_heldout=500,   # records of the held-out split (other seeds: never in train)
          seed=0,
          image_size=252,    # side the images are drawn at (resized to model.dcm.image_size)
          max_turns=1,       # questions per letter/count image (later ones: no <image>)
          # Question kinds drawn per record: "pattern" (a 1-px pattern the 84 px baseline
          # cannot see; learnt in a few hundred steps), "letter", "count" (one small mark
          # in a named cell: beyond a 10-minute CPU run of the random-init tiny model).
          kinds=("pattern",),
      )),
      tokenizer_path=config_dict.placeholder(str),  # a local HF tokenizer folder; None: the shipped BPE
      template="llama3",     # "llama3" (stage 2, inference) or "plain" (stage 1 captions)
      double_bos=True,       # keep the released pipeline's BOS BOS start (docs/fidelity.md#double-bos)
      # Labels: "reference" (LLaVA's preprocess_llama3 token counting, its "tokenization
      # mismatch" included) or "spans" (character overlap; data/templates.py says how they differ).
      label_rule="reference",
      image_aspect="pad",    # "pad" (expand to square, stage 2) or "square" (centre crop)
      max_length=128,        # tokens per row, image slots included
      overlong="truncate",   # longer samples: "truncate" the text or "drop" them (counted)
      packing=False,         # pack several samples per row (segment ids, positions)
      max_images_per_row=1,  # M: images a packed row may hold (pixels [B, M, H, W, 3])
      skip_bad_samples=False,  # False: the first bad record stops the run with its reason
      shuffle=True,
      seed=0,                # shuffle seed (reshuffled each epoch)
      group_by_modality=False,  # each global batch all-image or all-text, as LLaVA SFT
      batch_size=8,          # rows per host per step
      drop_remainder=True,
      worker_count=0,        # grain decode processes; 0 decodes in the main process
      worker_buffer_size=2,  # samples each worker prefetches
      read_threads=2,        # threads reading/decoding per process
      prefetch=8,            # samples buffered by those threads
  ))


def train_config() -> ConfigDict:
  """The tiny model starts from random weights, so every part trains (CLIP included)."""
  train = _sections.train_config(2)
  train.update(dict(
      # lr 1e-3 with the gradient norm clipped at 1: stable over seeds, where 2e-3 unclipped
      # was not (docs/performance.md#synthetic-main-job).
      lr=1e-3,
      max_grad_norm=1.0,
      steps=800,            # optimiser steps (overrides num_epochs): ~3 min on 2 CPU cores
      global_batch_size=config_dict.placeholder(int),  # None: data.batch_size per process
      trainable=(r"^vision/", r"^dem/", r"^projector/", r"^llm/"),
      log_every=50,
      seed=0,               # parameter init
      # With --init_from: regexes of the params to take (None: all it holds).
      init_include=config_dict.placeholder(tuple),
  ))
  return train


def get_config(arg: str = "infllava") -> ConfigDict:
  config = ConfigDict()
  config.model = tiny.model_config({"baseline": "llava", "anyres": "llava_next"}.get(
      arg, arg or "infllava"))
  config.model.llm.vocab_size = SHIPPED_VOCAB_SIZE
  config.data = data_config()
  config.train = train_config()
  if config.model.variant != "infllava":  # the baseline, AnyRes and S2 have no DEM
    config.train.trainable = tuple(p for p in config.train.trainable if p != r"^dem/")
  if config.model.variant == "llava_next":
    config.train.trainable += (r"^image_newline$",)
    # A square 252 px image takes a 2 x 2 grid of tiles: 12 x 12 features + 12 newlines +
    # the base view's 36 = 192 slots (the most any image takes here), beyond 128 tokens.
    config.data.max_length = 256
  config.checkpoint = _sections.checkpoint_config()
  config.checkpoint.every_steps = 200
  config.mesh = "data"       # a preset of infllava_jax/sharding.py, or "data=2,fsdp=4"
  config.sharding = sharding.default_config()  # logical axis -> mesh axes rules
  config.eval = ConfigDict(dict(heldout_examples=256, max_new_tokens=4))
  return config
