"""Run the ddtree Metal kernel bodies on the CPU (g++ and metal_compat.h), or on Metal through mx.fast.metal_kernel.

A kernel body (kernels/*.metal) is what mx.fast.metal_kernel takes as `source`. run_kernel writes the
signature around it the way MLX does (template parameters, inputs then outputs by name, the builtin attributes
the body mentions), compiles it with g++ once per (source, template values, argument dtypes), and runs the whole
grid with metal_compat.h's emulation of threadgroups and simdgroups. Outputs are poisoned with NaN first, so an
element the kernel forgets to write shows up.

The launch specs (tree_gated_delta_launch, tree_conv1d_launch) are the single description of how to call each
kernel; the Metal runners below use them with mx.fast.metal_kernel exactly as the dispatcher should.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ddtree_mlx.kernels.metal import (
    scratch_slots,
    tree_conv1d_launch,
    tree_gated_delta_launch,
    tree_levels,
)

HERE = Path(__file__).resolve().parent
KERNEL_DIR = HERE.parents[1] / "ddtree_mlx" / "kernels"
CXX = os.environ.get("CXX", "g++")

# dtype name -> (Metal type name as MLX spells it, numpy storage dtype). bfloat16 travels as uint16 bits.
DTYPES = {
    "float32": ("float", np.float32),
    "float16": ("half", np.float16),
    "bfloat16": ("bfloat16_t", np.uint16),
    "int32": ("int32_t", np.int32),
    "uint32": ("uint32_t", np.uint32),
}
POISON = {"float32": np.float32(np.nan), "float16": np.float16(np.nan), "bfloat16": np.uint16(0x7FC0), "int32": np.int32(-1),
          "uint32": np.uint32(0xFFFFFFFF)}

# Builtin attributes MLX declares when a body mentions them (in MLX's order; the quadgroup ones are not emulated).
ATTRIBUTES = [
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
UNSUPPORTED = re.compile(r"\b(dispatch_\w+|grid_origin|grid_size|\w*quadgroup\w*)\b")
COLLECTIVES = re.compile(r"\b(simd_\w+|simdgroup_barrier|threadgroup_barrier)\s*\(")


def harness_available() -> bool:
    """The CPU harness needs only a C++17 compiler (g++, or $CXX)."""
    return shutil.which(CXX) is not None


# ---------------------------------------------------------------------------------------------------------------
# bfloat16 as uint16 bits (round to nearest even, like MLX and Metal).


def to_bfloat16(x) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(np.asarray(x, np.float32)), np.uint16(0x7FC0), rounded)


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


def round_bfloat16(x) -> np.ndarray:
    """float32 values exactly representable in bfloat16 (what a kernel sees after the cast)."""
    return from_bfloat16(to_bfloat16(x))


def _storage(x, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return to_bfloat16(x)
    return np.ascontiguousarray(x, dtype=DTYPES[dtype][1])


def _as_float32(x: np.ndarray, dtype: str) -> np.ndarray:
    return from_bfloat16(x) if dtype == "bfloat16" else x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Kernel sources (the launch specs live in ddtree_mlx.kernels.metal, shared with the dispatcher).


def kernel_source(name: str) -> str:
    return (KERNEL_DIR / name).read_text()


# ---------------------------------------------------------------------------------------------------------------
# The CPU harness.

_binaries: dict[str, Path] = {}


def _cache_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    path = Path(tempfile.gettempdir()) / f"ddtree-metal-harness-{uid}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _compiler_id() -> str:
    return CXX + subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout


# MLX's signature (mx.fast.metal_kernel's write_signature): an input array of fewer than this many elements is passed
# in `constant` memory, others in `device` memory, a 0-d input (a Python scalar) by `constant` reference.
CONSTANT_BELOW = 8
PARAMS = {"in": "const device {t}* {n}", "constant": "const constant {t}* {n}", "scalar": "const constant {t}& {n}",
          "out": "device {t}* {n}"}


def _generate(source: str, source_name: str, args: list[tuple[str, str, str]], template: list[tuple[str, object]]):
    """C++ for one instantiation. args: (name, metal type, kind) with kind 'in', 'constant', 'scalar' or 'out',
    written as MLX writes them (metal_compat.h keeps `constant` apart from `device`, so g++ rejects a device pointer
    taken from a constant array, as Metal does)."""
    for name, _, kind in args:
        if kind != "scalar" and re.search(rf"\b{name}_(shape|strides|ndim)\b", source):
            raise NotImplementedError(f"{name}_shape/_strides/_ndim are not emulated; pass sizes as template values")
    params = []
    for name, ctype, kind in args:
        params.append(PARAMS[kind].format(t=ctype, n=name))
    if UNSUPPORTED.search(source):
        raise NotImplementedError(f"harness: {UNSUPPORTED.search(source).group(0)} is not emulated")
    attributes = [(name, ctype) for name, ctype in ATTRIBUTES if name in source]
    params += [f"{ctype} {name}" for name, ctype in attributes]

    def value(v):
        return DTYPES[v][0] if isinstance(v, str) else str(int(v))

    head = ""
    call = "harness_kernel"
    if template:
        kinds = ["typename" if isinstance(v, str) else "bool" if isinstance(v, bool) else "int" for _, v in template]
        head = "template <" + ", ".join(f"{k} {n}" for k, (n, _) in zip(kinds, template)) + ">\n"
        call += "<" + ", ".join(value(v) for _, v in template) + ">"
    casts = []
    for i, (name, ctype, kind) in enumerate(args):
        const = "" if kind == "out" else "const "
        deref = "*" if kind == "scalar" else ""
        casts.append(f"{deref}static_cast<{const}{ctype}*>(b[{i}])")
    casts += [f"ids.{name}" for name, _ in attributes]
    is_output = ", ".join("1" if kind == "out" else "0" for _, _, kind in args)
    return (
        '#include "metal_compat.h"\n\n'
        f"{head}void harness_kernel(\n    " + ",\n    ".join(params) + ") {\n"
        f'#line 1 "{source_name}"\n{source}\n}}\n\n'
        "static void harness_kernel_thread(void** b, const harness::ThreadIds& ids) {\n"
        f"  {call}(\n      " + ",\n      ".join(casts) + ");\n}\n"
        f"static const int harness_buffer_count = {len(args)};\n"
        f"static const bool harness_is_output[] = {{{is_output}}};\n\n"
        '#include "driver.cpp"\n'
    )


def _binary(cpp: str, sync: bool) -> Path:
    flags = ["-std=c++17", "-O2", "-pthread", "-U_FORTIFY_SOURCE", f"-DHARNESS_SYNC={int(sync)}", f"-I{HERE}"]
    if sys.platform == "darwin":
        flags += ["-D_XOPEN_SOURCE=600", "-Wno-deprecated-declarations"]  # ucontext
    support = (HERE / "metal_compat.h").read_text() + (HERE / "driver.cpp").read_text()
    key = hashlib.sha256("\0".join([cpp, support, _compiler_id(), *flags]).encode()).hexdigest()[:24]
    if key in _binaries:
        return _binaries[key]
    binary = _cache_dir() / f"kernel-{key}"
    if not binary.exists():
        with tempfile.TemporaryDirectory(dir=_cache_dir()) as work:
            src = Path(work) / "kernel.cpp"
            src.write_text(cpp)
            result = subprocess.run([CXX, *flags, str(src), "-o", str(Path(work) / "kernel")],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"harness: g++ failed\n{result.stderr}")
            os.replace(Path(work) / "kernel", binary)  # atomic: concurrent sessions may race on the same key
    _binaries[key] = binary
    return binary


def run_kernel(source, inputs, outputs, template, grid, threadgroup, source_name="kernel.metal"):
    """Run a kernel body on the CPU.

    inputs: [(name, value, dtype)]: a numpy array with a DTYPES name (float data is rounded for bfloat16), or a
    Python int/float scalar with dtype None. outputs: [(name, shape, dtype)]. template: [(name, int | bool | dtype
    name)]. Returns the outputs as numpy arrays (bfloat16 ones as uint16 bits)."""
    args, data = [], []
    for name, value, dtype in inputs:
        if dtype is None:  # a scalar, passed by reference like MLX's `const constant int& name`
            is_int = isinstance(value, (int, np.integer))
            args.append((name, "int32_t" if is_int else "float", "scalar"))
            data.append(np.asarray(value, np.int32 if is_int else np.float32))
        else:
            args.append((name, DTYPES[dtype][0], "constant" if np.size(value) < CONSTANT_BELOW else "in"))
            data.append(_storage(value, dtype))
    for name, shape, dtype in outputs:
        args.append((name, DTYPES[dtype][0], "out"))
        data.append(np.full(shape, POISON[dtype], dtype=DTYPES[dtype][1]))
    cpp = _generate(source, source_name, args, template)
    binary = _binary(cpp, sync=bool(COLLECTIVES.search(source)))
    with tempfile.TemporaryDirectory() as work:
        for i, array in enumerate(data):
            np.ascontiguousarray(array).tofile(Path(work) / f"b{i}.bin")
        command = [str(binary), work, *map(str, grid), *map(str, threadgroup)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"harness: kernel run failed ({result.returncode})\n{result.stderr}")
        first_output = len(inputs)
        return [
            np.fromfile(Path(work) / f"b{first_output + j}.bin", dtype=DTYPES[dtype][1]).reshape(shape)
            for j, (_, shape, dtype) in enumerate(outputs)
        ]


def _launch_cpu(spec, inputs):
    """inputs: [(value, dtype)] in spec order. Returns float32 numpy outputs."""
    named = [(name, value, dtype) for name, (value, dtype) in zip(spec["input_names"], inputs)]
    outputs = list(zip(spec["output_names"], spec["output_shapes"], spec["output_dtypes"]))
    results = run_kernel(kernel_source(spec["source"]), named, outputs, spec["template"], spec["grid"],
                         spec["threadgroup"], source_name=spec["source"])
    return [_as_float32(r, dtype) for r, dtype in zip(results, spec["output_dtypes"])]


def cpu_metal_kernel(*, name, input_names, output_names, source):
    """A stand-in for mx.fast.metal_kernel that runs the body on the CPU harness: put it where
    ddtree_mlx.kernels.dispatch.kernel_maker looks, and the engine's dispatch runs the real kernel bodies here."""
    import mlx.core as mx

    names = {mx.float32: "float32", mx.bfloat16: "bfloat16", mx.float16: "float16", mx.int32: "int32",
             mx.uint32: "uint32"}

    def numpy_of(value):
        if not isinstance(value, mx.array):
            return value, None
        if value.dtype == mx.bfloat16:
            return np.array(value.astype(mx.float32)), "bfloat16"  # exact: bfloat16 values fit in float32
        return np.array(value), names[value.dtype]

    def run(*, inputs, template, grid, threadgroup, output_shapes, output_dtypes, **_):
        named = [(n, *numpy_of(v)) for n, v in zip(input_names, inputs)]
        template = [(n, names[v] if isinstance(v, mx.Dtype) else v) for n, v in template]
        outputs = [(n, shape, names[dtype]) for n, shape, dtype in zip(output_names, output_shapes, output_dtypes)]
        results = run_kernel(source, named, outputs, template, grid, threadgroup, source_name=name)
        return [mx.array(_as_float32(r, names[d])).astype(d) for r, d in zip(results, output_dtypes)]

    return run


# ---------------------------------------------------------------------------------------------------------------
# The same launches through mx.fast.metal_kernel (Apple GPUs only): what the dispatcher has to do.

_metal_kernels: dict[str, object] = {}


def _launch_metal(spec, inputs):
    import mlx.core as mx

    if spec["name"] not in _metal_kernels:
        _metal_kernels[spec["name"]] = mx.fast.metal_kernel(
            name=spec["name"], input_names=spec["input_names"], output_names=spec["output_names"],
            source=kernel_source(spec["source"]))
    arrays = []
    for value, dtype in inputs:
        if dtype is None:
            arrays.append(value)
        elif dtype == "bfloat16":
            arrays.append(mx.array(np.asarray(value, np.float32)).astype(mx.bfloat16))
        else:
            arrays.append(mx.array(np.ascontiguousarray(value, DTYPES[dtype][1])))
    outs = _metal_kernels[spec["name"]](
        inputs=arrays, template=spec["template"], grid=spec["grid"], threadgroup=spec["threadgroup"],
        output_shapes=spec["output_shapes"], output_dtypes=spec["output_dtypes"], init_value=float("nan"))
    return [np.array(o.astype(mx.float32)) for o in outs]


def _dtype_tokens(backend: str):
    if backend == "cpu":
        return {"float32": "float32", "bfloat16": "bfloat16"}, _launch_cpu
    if backend == "metal":
        import mlx.core as mx

        return {"float32": mx.float32, "bfloat16": mx.bfloat16}, _launch_metal
    raise ValueError(f"unknown backend {backend!r}")


# ---------------------------------------------------------------------------------------------------------------
# The two kernels.


def run_tree_gated_delta(q, k, v, g, beta, state, parent, *, dtype="float32", g_dtype="float32", beta_dtype=None,
                         slots=None, order=None, backend="cpu"):
    """y [T,Hv,Dv], delta [T,Hv,Dv] (float32 numpy) for the tree given by parent [T].

    q, k, v (and beta unless beta_dtype says otherwise) are passed as `dtype`, g as `g_dtype`; bfloat16 inputs are
    rounded to nearest even. slots overrides the node slots per row; order overrides the within-level order."""
    T, Hk, Dk = np.shape(q)
    Hv, Dv = np.shape(v)[1:]
    level_order, level_start = tree_levels(parent)
    if order is not None:
        level_order = np.asarray(order, np.int32)
    scratch_slot, rows = scratch_slots(level_order, level_start)
    widths = np.diff(level_start)
    tokens, launch = _dtype_tokens(backend)
    spec = tree_gated_delta_launch(T=T, Hk=Hk, Hv=Hv, Dk=Dk, Dv=Dv, in_dtype=tokens[dtype], f32=tokens["float32"],
                                   max_level_width=int(widths.max()), scratch_rows=rows, slots=slots)
    inputs = [(q, dtype), (k, dtype), (v, dtype), (g, g_dtype), (beta, beta_dtype or dtype), (state, "float32"),
              (np.asarray(parent, np.int32), "int32"), (level_order, "int32"), (level_start, "int32"),
              (scratch_slot, "int32"), (len(widths), None)]
    y, delta, _ = launch(spec, inputs)
    return y, delta


def run_tree_conv1d(x, conv_state, weight, parent, *, dtype="float32", state_dtype=None, weight_dtype="float32",
                    backend="cpu"):
    """out [T,C], windows [T,K-1,C] (float32 numpy). x is passed as `dtype`, conv_state as state_dtype (default
    dtype), weight ([C,K] or [C,K,1]) as weight_dtype."""
    T, C = np.shape(x)
    K = np.shape(weight)[1]
    tokens, launch = _dtype_tokens(backend)
    spec = tree_conv1d_launch(T=T, C=C, K=K, in_dtype=tokens[dtype])
    inputs = [(x, dtype), (conv_state, state_dtype or dtype), (np.reshape(weight, (C, K)), weight_dtype),
              (np.asarray(parent, np.int32), "int32")]
    out, windows = launch(spec, inputs)
    return out, windows
