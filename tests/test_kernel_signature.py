"""The CPU harness writes MLX's real kernel signature (inputs under 8 elements in `constant` memory, 0-d inputs by
`constant` reference) and keeps the address spaces apart, so g++ rejects what the Metal compiler would; and the
doctor lists every kernel variant it checked, float16 and the hybrid self-test's included."""

import numpy as np
import pytest
from metal_harness import harness as H

from ddtree_mlx import DDTreeConfig
from ddtree_mlx.cli import doctor
from ddtree_mlx.kernels import dispatch, guard, metal
from ddtree_mlx.kernels.metal import tree_conv1d_launch

pytestmark = pytest.mark.skipif(not H.harness_available(), reason=f"no C++ compiler ({H.CXX}) for the harness")
COPY = "out[thread_position_in_grid.x] = a[thread_position_in_grid.x];"
DEVICE_POINTER = "const device float* first = a;\nout[thread_position_in_grid.x] = first[thread_position_in_grid.x];"


def run(source: str, size: int):
    return H.run_kernel(source, [("a", np.arange(size, dtype=np.float32), "float32")],
                        [("out", (size,), "float32")], [], (size, 1, 1), (size, 1, 1))


def test_a_device_pointer_from_a_constant_array_does_not_compile():
    assert run(DEVICE_POINTER, 8)[0].tolist() == list(range(8))  # 8 elements: device memory, as on a Mac
    assert run(COPY, 4)[0].tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="invalid conversion"):
        run(DEVICE_POINTER, 4)  # 4 elements: MLX passes `a` in constant memory, which Metal would refuse too


def conv_inputs(T: int, table: np.ndarray):
    spec = tree_conv1d_launch(T=T, C=8, K=4, in_dtype="float32")
    rng = np.random.default_rng(0)
    named = [("x", rng.normal(size=(T, 8)).astype(np.float32), "float32"),
             ("conv_state", rng.normal(size=(3, 8)).astype(np.float32), "float32"),
             ("weight", rng.normal(size=(8, 4)).astype(np.float32), "float32"), ("parent", table, "int32")]
    outputs = list(zip(spec["output_names"], spec["output_shapes"], ["float32", "float32"]))
    return named, outputs, [("InT", "float32"), ("C", 8), ("K", 4)], spec["grid"], spec["threadgroup"]


def test_a_broken_copy_of_a_kernel_is_caught_only_where_a_table_is_small():
    """A copy of the tree conv that takes a device pointer to its parent table: wrong on a Mac whenever the table
    has fewer than 8 entries. The engine pads the tables (metal.padded), so the real kernels never meet it."""
    broken = H.kernel_source("tree_conv1d.metal").replace(
        "const int p = parent[r - (K - 1)];", "const device int32_t* parents = parent;\n    const int p = parents[r - (K - 1)];")
    assert broken != H.kernel_source("tree_conv1d.metal")
    parents = np.array([-1, 0, 1], np.int32)
    with pytest.raises(RuntimeError, match="invalid conversion"):
        H.run_kernel(broken, *conv_inputs(3, parents))
    padded_run = H.run_kernel(broken, *conv_inputs(3, metal.padded(parents, -1)))
    real_run = H.run_kernel(H.kernel_source("tree_conv1d.metal"), *conv_inputs(3, parents))
    assert np.array_equal(padded_run[0], real_run[0])


@pytest.mark.slow
def test_the_doctor_lists_every_variant_it_checked(monkeypatch, tmp_path):
    state = guard.Guard()
    for module in (dispatch, doctor):
        monkeypatch.setattr(module, "GUARD", state)
    monkeypatch.setattr(dispatch, "_PREPARED", set())
    monkeypatch.setattr(dispatch, "kernel_maker", lambda: H.cpu_metal_kernel)
    monkeypatch.setattr(doctor, "self_test", lambda model, draft, config: {"ok": True, "runs": []})
    metal._built.cache_clear()
    report = doctor.report(None, None, DDTreeConfig(cache_dir=str(tmp_path)))
    metal._built.cache_clear()
    variants = report["kernels"]["variants"]
    names = " ".join(v["variant"] for v in variants)
    assert report["ok"] and all(v["ok"] for v in variants), variants
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"InT={dtype}" in names
    for slots in (1, 2, 4):
        assert f"slots={slots})" in names
    assert "Dk=32, Dv=16, Hk=2, Hv=4" in names  # the tiny hybrid self-test's own shape
    hybrid = report["hybrid_self_test"]["runs"]
    assert [run["dtype"] for run in hybrid] == ["float32", "bfloat16", "float16"]
    assert all(run["ok"] and run["kernels"] == "metal" for run in hybrid)
