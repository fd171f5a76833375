"""The `ddtree-mlx` command: generate, serve, train-drafter, write-prompts, doctor."""
