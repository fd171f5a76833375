"""The tree conv and tree gated-delta recurrence of hybrid targets: the pure-MLX twin (recurrence), the Metal
kernels and their dispatch (metal, *.metal), and the self-check a kernel passes before a process uses it (check)."""
