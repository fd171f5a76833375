"""What benchmark.py runs, one job per module: the prompts (prompts), the targets and drafters of each preset and
the variants compared (presets), long prompts prefilled once (prefills), single runs of each method and of
mlx-lm (runners), the side-by-side generation comparison (generation), concurrent requests served batched and one
at a time beside mlx-lm's batching (concurrency) with a request joining a running batch and memory per row
(joining), the engine's micro-measurements (measurements), and tables and plots (report)."""
