"""What benchmark.py runs, one job per module: the prompts (prompts), the targets and drafters of each preset and
the variants compared (presets), long prompts prefilled once (prefills), single runs of each method and of
mlx-lm (runners), the side-by-side generation comparison (generation), the engine's micro-measurements
(measurements), and tables and plots (report)."""
