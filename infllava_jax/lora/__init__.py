"""LoRA: low-rank adapters on the language model's linear layers (training, merging, PEFT checkpoints)."""
