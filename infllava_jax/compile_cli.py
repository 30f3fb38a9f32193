"""`infllava compile`: the train step ahead of time (`training/compile.py`) or, with
`--inference`, the generation program the `Assistant` runs (`inference_compile.py`)."""

from __future__ import annotations


def main(argv: list[str]) -> int:
  if "--inference" in argv:
    from infllava_jax import inference_compile
    return inference_compile.main([a for a in argv if a != "--inference"])
  from infllava_jax.training import compile as train_compile
  return train_compile.main(argv)
