"""Which BLAS MLX's CPU backend runs on. MLX's Linux CPU wheel links a reference BLAS (~3 GFLOP/s); Debian's
OpenBLAS, preloaded, is ~25x faster, so every speed number should say which one it ran on."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import mlx.core as mx

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
HINT = ("MLX's Linux CPU wheel uses a slow reference BLAS; for ~25x faster matmuls: apt-get install "
        "libopenblas0-pthread (ddtree-mlx and benchmark.py then preload it themselves; DDTREE_OPENBLAS=0 turns that off)")


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


def use_openblas(enabled: bool) -> None:
    """Re-run this process with Debian's OpenBLAS preloaded, on Linux, when it is installed and not in use yet
    (a BLAS can only replace MLX's bundled one before the process starts). Call it first thing in a command."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    if not enabled or platform.system() != "Linux" or "openblas" in preloaded.lower() or not Path(OPENBLAS).exists():
        return
    env = dict(os.environ, LD_PRELOAD=":".join(filter(None, [OPENBLAS, preloaded])),
               OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", str(cores())))
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def cores() -> int:
    """The cores this process may run on: OpenBLAS's threads. On this 2-core CPU, 2 threads against 1 (SmolLM2-135M,
    float32): a one-token step 69 -> 62 ms, 8 rows' step 114 -> 89 ms, DDTree auto 7-15% faster, mlx-lm's loops
    alike (BENCHMARKS.md)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def slow_blas() -> bool:
    return platform.system() == "Linux" and mx.default_device() == mx.cpu and "reference" in blas_name()
