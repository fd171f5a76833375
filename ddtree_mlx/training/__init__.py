"""Training a DFlash drafter on MLX: the target's own answers as data, prompts the model writes, and the trainer."""
