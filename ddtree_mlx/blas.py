"""Which BLAS MLX's CPU backend runs on. MLX's Linux CPU wheel links a reference BLAS (~3 GFLOP/s); Debian's
OpenBLAS, preloaded, is ~25x faster, so every speed number should say which one it ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
HINT = (f"MLX's Linux CPU wheel uses a slow reference BLAS; for ~25x faster matmuls: "
        f"apt-get install libopenblas0-pthread, then run with LD_PRELOAD={OPENBLAS} OPENBLAS_NUM_THREADS=1")


def blas_name() -> str:
    if platform.system() == "Darwin":
        return "Apple (Metal GPU)" if mx.metal.is_available() else "Apple Accelerate"
    # Only a preloaded BLAS replaces MLX's symbols; numpy's own bundled OpenBLAS shows in the process maps too,
    # but MLX never calls it.
    preloaded = os.environ.get("LD_PRELOAD", "")
    maps = Path("/proc/self/maps")
    if "openblas" in preloaded.lower() and maps.exists() and OPENBLAS.rsplit("/", 2)[-2] in maps.read_text():
        return f"OpenBLAS (preloaded, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')})"
    return "MLX CPU wheel's reference BLAS (slow)"


def slow_blas() -> bool:
    return platform.system() == "Linux" and mx.default_device() == mx.cpu and "reference" in blas_name()
