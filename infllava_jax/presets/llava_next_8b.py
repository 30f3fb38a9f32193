"""LLaVA-NeXT (AnyRes) on INF-LLaVA's towers: the llama3-llava-next-8b layout.

CLIP-ViT-L/14-336 + LLaMA-3-8B, as INF-LLaVA-8B, with llama3-llava-next-8b's AnyRes front end
(infllava_jax/model/anyres.py): grids of 336 px tiles up to 672 x 672, 1008 x 336 and
336 x 1008, plus the base view, the spatial_unpad merge and a learned image_newline: up to
576 + 48 x 49 = 2,928 visual tokens per image. `get_config()` is stage 2 (instruction tuning)
with INF-LLaVA-8B's recipe (infllava_8b_stage2.py: projector + LLM + image_newline trained,
CLIP frozen, global batch 128), so the two front ends compare on the same towers and
recipe, at LLaVA-NeXT's fine-tuning context of 4,096 tokens (LLaVA-1.6's model_max_length):
2,048 cannot hold a large image's tokens.

  infllava compile --config llava_next_8b --mesh fsdp=8 --device-memory 80GiB
  infllava convert from-pytorch --llava-hf llama3-llava-next-8b-hf/ --out ckpt/  # its
      # vocabulary, image token id and pinpoints come from the checkpoint

`get_config("model")` gives the model section alone (as infllava_8b:llava_next).
"""

from ml_collections import ConfigDict

from infllava_jax.errors import ConfigError
from infllava_jax.presets import infllava_8b, infllava_8b_stage2

CONTEXT = 4096


def model_config() -> ConfigDict:
  model = infllava_8b_stage2.model_config()  # bf16 compute, bf16 frozen CLIP, MLP chunks
  anyres = infllava_8b.model_config("llava_next")
  for key in ("variant", "dcm", "dem", "anyres"):
    model[key] = anyres[key]
  return model


def get_config(arg: str = "") -> ConfigDict:
  if arg == "model":
    config = ConfigDict()
    config.model = infllava_8b.model_config("llava_next")
    return config
  if arg:
    raise ConfigError(f"llava_next_8b: unknown arg {arg!r}; expected '' (stage 2) or 'model'")
  config = infllava_8b_stage2.get_config()
  config.model = model_config()
  config.data.max_length = CONTEXT
  config.train.trainable = (r"^projector/", r"^llm/", r"^image_newline$")
  config.train.init_include = (r"^projector/",)
  return config
