"""The tree Metal kernels (kernels/*.metal) against a plain numpy reference.

TestHarnessKernels runs the kernel bodies on the CPU through tests/metal_harness (g++ plus an emulation of the
Metal builtins, simdgroups included); TestMetalKernels runs the same checks through mx.fast.metal_kernel on an
Apple GPU. Inputs are random numbers from a fixed seed, so every run checks the same ones; KERNEL_TEST_SEED=<seed>
draws others (a failure prints the seed that reproduces it).
"""

import os

import mlx.core as mx
import numpy as np
import pytest
from metal_harness import harness as H

SEED = int(os.environ.get("KERNEL_TEST_SEED", "0"))


@pytest.fixture
def rng(request):
    return np.random.default_rng([SEED, sum(map(ord, request.node.name))])


# ---------------------------------------------------------------------------------------------------------------
# Reference (float64, a loop over nodes following parents).


def ref_tree_gated_delta(q, k, v, g, beta, state, parent):
    q, k, v, g, beta, state = (np.asarray(a, np.float64) for a in (q, k, v, g, beta, state))
    T, Hk, Dk = q.shape
    Hv, Dv = v.shape[1:]
    heads = np.arange(Hv) // (Hv // Hk)
    y, deltas = np.zeros((T, Hv, Dv)), np.zeros((T, Hv, Dv))
    states = np.zeros((T, Hv, Dv, Dk))
    for t in range(T):
        S = g[t, :, None, None] * (state if parent[t] < 0 else states[parent[t]])
        kt, qt = k[t, heads], q[t, heads]  # [Hv, Dk]
        kv = np.einsum("hvk,hk->hv", S, kt)
        deltas[t] = (v[t] - kv) * beta[t, :, None]
        S = S + deltas[t][:, :, None] * kt[:, None, :]
        states[t] = S
        y[t] = np.einsum("hvk,hk->hv", S, qt)
    return y, deltas, states


def committed_states(delta, k, g, state, parent):
    """Every node's state as the engine's commit rebuilds it from the kernel's deltas (closed form)."""
    from ddtree_mlx.kernels.recurrence import delta_record

    ancestors = np.zeros((len(parent), len(parent)), dtype=bool)
    for t, p in enumerate(parent):
        ancestors[t] = ancestors[p] if p >= 0 else False
        ancestors[t, t] = True
    record = delta_record(mx.array(delta), mx.array(k), mx.array(np.log(g)), mx.array(state), mx.array(ancestors))
    return np.array(record.state_at(mx.arange(len(parent))))


def ref_tree_conv1d(x, conv_state, weight, parent):
    x, conv_state = np.asarray(x, np.float64), np.asarray(conv_state, np.float64)
    weight = np.asarray(weight, np.float64).reshape(x.shape[1], -1)
    K = weight.shape[1]
    T = x.shape[0]
    out = np.zeros_like(x)
    windows = np.zeros((T, K - 1, x.shape[1]))
    for t in range(T):
        window = [x[t]]  # newest first while walking up
        node, cached = t, K - 1
        while len(window) < K:
            if node >= 0:
                node = parent[node]
            if node >= 0:
                window.append(x[node])
            else:
                cached -= 1
                window.append(conv_state[cached])
        window = np.stack(window[::-1])  # [K, C], oldest first
        z = (window * weight.T).sum(axis=0)
        out[t] = z / (1.0 + np.exp(-z))
        windows[t] = window[1:]
    return out, windows


# ---------------------------------------------------------------------------------------------------------------
# Trees and inputs.


def chain(T):
    return [-1] + list(range(T - 1))


def fan(children):
    return [-1] + [0] * children


def random_tree(rng, T):
    return [-1] + [int(rng.integers(0, t)) for t in range(1, T)]


def two_branches(T):
    """Root with two long chains: exercises register reuse alongside reloads from the scratch."""
    return [-1, 0, 0] + [t - 2 for t in range(3, T)]


def trees(rng):
    return {"chain32": chain(32), "fan16": fan(15), "random24": random_tree(rng, 24), "single": [-1]}


def gdn_inputs(rng, T, Hk, Hv, Dk, Dv):
    def unit(shape):
        a = rng.standard_normal(shape)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    q = unit((T, Hk, Dk)) * Dk**-0.5  # normalize_qk folds the readout scale into q
    k = unit((T, Hk, Dk))
    v = rng.standard_normal((T, Hv, Dv))
    g = rng.uniform(0.2, 1.0, (T, Hv))
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal((T, Hv))))
    state = rng.standard_normal((Hv, Dv, Dk)) * 0.5
    return [a.astype(np.float32) for a in (q, k, v, g, beta, state)]


def conv_inputs(rng, T, C, K):
    x = rng.standard_normal((T, C))
    conv_state = rng.standard_normal((K - 1, C))
    weight = rng.standard_normal((C, K, 1)) * 0.5  # mlx-lm's conv1d.weight layout
    return [a.astype(np.float32) for a in (x, conv_state, weight)]


def close(actual, expected, rel, what):
    """Within rel of each element plus rel of the largest magnitude (sums over Dk cancel)."""
    scale = float(np.abs(expected).max()) if expected.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rel, atol=rel * scale,
                               err_msg=f"{what} (KERNEL_TEST_SEED={SEED})")


needs_harness = pytest.mark.skipif(not H.harness_available(),
                                   reason=f"{H.CXX} not found: the CPU Metal harness needs a C++17 compiler")
needs_metal = pytest.mark.skipif(not mx.metal.is_available(),
                                 reason="Metal not available (mx.metal.is_available() is False)")

BIG = dict(Hk=2, Hv=4, Dk=128, Dv=128)
SMALL = dict(Hk=1, Hv=3, Dk=32, Dv=6)  # Hv * Dv = 18 rows: partial threadgroups for every slot count


# ---------------------------------------------------------------------------------------------------------------
# The checks, run once per backend.


class KernelChecks:
    backend = None

    def gated_delta(self, inputs, parent, *, dtype="float32", g_dtype="float32", beta_dtype=None, **kwargs):
        q, k, v, g, beta, state = inputs
        y, delta = H.run_tree_gated_delta(q, k, v, g, beta, state, parent, dtype=dtype, g_dtype=g_dtype,
                                          beta_dtype=beta_dtype, backend=self.backend, **kwargs)
        # The reference sees exactly the values the kernel sees.
        seen = [H.round_bfloat16(a) if d == "bfloat16" else a
                for a, d in zip(inputs, [dtype, dtype, dtype, g_dtype, beta_dtype or dtype, "float32"])]
        y_ref, delta_ref, states_ref = ref_tree_gated_delta(*seen, parent)
        close(delta, delta_ref, 1e-5, f"delta, parent={parent}")
        states = committed_states(delta, seen[1], seen[3], state, parent)
        return (y, states), (y_ref, states_ref)

    @pytest.mark.parametrize("tree", ["chain32", "fan16", "random24", "single"])
    def test_gated_delta_float32(self, rng, tree):
        parent = trees(rng)[tree]
        (y, states), (y_ref, states_ref) = self.gated_delta(gdn_inputs(rng, len(parent), **BIG), parent)
        close(y, y_ref, 1e-5, f"y, {tree}")
        close(states, states_ref, 1e-5, f"node_states, {tree}")

    @pytest.mark.parametrize("tree", ["chain32", "random24"])
    def test_gated_delta_bfloat16(self, rng, tree):
        """mlx-lm's dtypes: q, k, v, beta in bfloat16, g in float32; state math stays float32."""
        parent = trees(rng)[tree]
        (y, states), (y_ref, states_ref) = self.gated_delta(gdn_inputs(rng, len(parent), **BIG), parent,
                                                            dtype="bfloat16")
        close(y, y_ref, 1e-2, f"y, {tree}")
        close(states, states_ref, 1e-5, f"node_states, {tree}")

    def test_gated_delta_all_bfloat16_small_heads(self, rng):
        parent = random_tree(rng, 20)
        (y, states), (y_ref, states_ref) = self.gated_delta(gdn_inputs(rng, len(parent), **SMALL), parent,
                                                            dtype="bfloat16", g_dtype="bfloat16")
        close(y, y_ref, 1e-2, "y")
        close(states, states_ref, 1e-5, "node_states")

    def test_gated_delta_many_trees(self, rng):
        shapes = [chain(9), fan(7), two_branches(17), [-1, 0, 1, 1, 0, 4, 2, 6, 6, 3]]
        shapes += [random_tree(rng, int(rng.integers(2, 40))) for _ in range(4)]
        for parent in shapes:
            (y, states), (y_ref, states_ref) = self.gated_delta(gdn_inputs(rng, len(parent), **SMALL), parent)
            close(y, y_ref, 1e-5, f"y, parent={parent}")
            close(states, states_ref, 1e-5, f"node_states, parent={parent}")

    def test_gated_delta_schedule_invariant(self, rng):
        """Slot count and the order of nodes within a level change nothing, bit for bit."""
        parent = random_tree(rng, 30)
        inputs = gdn_inputs(rng, len(parent), **SMALL)
        y, delta = H.run_tree_gated_delta(*inputs, parent, slots=1, backend=self.backend)
        order, level_start = H.tree_levels(parent)
        shuffled = np.concatenate([rng.permutation(order[a:b]) for a, b in zip(level_start[:-1], level_start[1:])])
        for kwargs in [dict(slots=2), dict(slots=4), dict(slots=4, order=shuffled), dict(slots=1, order=shuffled)]:
            y2, delta2 = H.run_tree_gated_delta(*inputs, parent, backend=self.backend, **kwargs)
            np.testing.assert_array_equal(y2, y, err_msg=str(kwargs))
            np.testing.assert_array_equal(delta2, delta, err_msg=str(kwargs))

    def conv(self, inputs, parent, *, dtype="float32", weight_dtype="float32"):
        x, conv_state, weight = inputs
        out, windows = H.run_tree_conv1d(x, conv_state, weight, parent, dtype=dtype, weight_dtype=weight_dtype,
                                         backend=self.backend)
        seen = [H.round_bfloat16(a) if d == "bfloat16" else a for a, d in zip(inputs, [dtype, dtype, weight_dtype])]
        return (out, windows), ref_tree_conv1d(*seen, parent)

    @pytest.mark.parametrize("tree", ["chain32", "fan16", "random24", "single"])
    def test_conv1d_float32(self, rng, tree):
        parent = trees(rng)[tree]
        (out, windows), (out_ref, windows_ref) = self.conv(conv_inputs(rng, len(parent), C=300, K=4), parent)
        close(out, out_ref, 1e-5, f"out, {tree}")
        np.testing.assert_array_equal(windows, windows_ref.astype(np.float32))

    @pytest.mark.parametrize("tree", ["chain32", "random24"])
    def test_conv1d_bfloat16(self, rng, tree):
        parent = trees(rng)[tree]
        inputs = conv_inputs(rng, len(parent), C=300, K=4)
        (out, windows), (out_ref, windows_ref) = self.conv(inputs, parent, dtype="bfloat16", weight_dtype="bfloat16")
        close(out, out_ref, 1e-2, f"out, {tree}")
        np.testing.assert_array_equal(windows, windows_ref.astype(np.float32))

    def test_conv1d_kernel_size_2(self, rng):
        parent = random_tree(rng, 12)
        (out, windows), (out_ref, windows_ref) = self.conv(conv_inputs(rng, len(parent), C=40, K=2), parent)
        close(out, out_ref, 1e-5, "out")
        np.testing.assert_array_equal(windows, windows_ref.astype(np.float32))


@needs_harness
class TestHarnessKernels(KernelChecks):
    backend = "cpu"


@needs_metal
class TestMetalKernels(KernelChecks):
    backend = "metal"


# ---------------------------------------------------------------------------------------------------------------
# The reference against mlx-lm on a chain, and the harness against itself.


def test_scratch_rows_are_never_shared_by_live_states(rng):
    """A node's state must survive until its children (one level down) have read it: rows are unique within a
    level and disjoint between neighbouring levels; a deep tree needs only two levels' worth of rows."""
    from ddtree_mlx.kernels.metal import scratch_slots, tree_levels

    for parent in [chain(32), fan(15), two_branches(21), *[random_tree(rng, 40) for _ in range(5)]]:
        order, level_start = tree_levels(parent)
        slot, rows = scratch_slots(order, level_start)
        levels = [set(slot[order[a:b]].tolist()) for a, b in zip(level_start[:-1], level_start[1:])]
        assert all(len(level) == b - a for level, a, b in zip(levels, level_start[:-1], level_start[1:]))
        assert all(not (upper & lower) for upper, lower in zip(levels, levels[1:]))
        assert 0 <= slot.min() and slot.max() < rows <= min(len(parent), 2 * int(np.diff(level_start).max()))
    assert scratch_slots(*tree_levels(chain(32)))[1] == 2


def test_reference_matches_mlx_lm_on_a_chain(rng):
    from mlx_lm.models.gated_delta import gated_delta_ops

    inputs = gdn_inputs(rng, 12, **BIG)
    y_ref, _, states_ref = ref_tree_gated_delta(*inputs, chain(12))
    q, k, v, g, beta, state = (mx.array(a)[None] for a in inputs)
    y, last = gated_delta_ops(q, k, v, g, beta, state)
    close(np.array(y[0]), y_ref, 1e-5, "y")
    close(np.array(last[0]), states_ref[-1], 1e-5, "state")


def test_conv_reference_matches_mlx_conv1d_on_a_chain(rng):
    x, conv_state, weight = conv_inputs(rng, 10, C=24, K=4)
    out_ref, windows_ref = ref_tree_conv1d(x, conv_state, weight, chain(10))
    rows = mx.array(np.concatenate([conv_state, x]))[None]  # [1, K-1+T, C]
    out = mx.conv1d(rows, mx.array(weight), groups=x.shape[1])  # valid padding: one output per node
    close(np.array(out * mx.sigmoid(out))[0], out_ref, 1e-5, "out")
    np.testing.assert_array_equal(windows_ref[-1], np.concatenate([conv_state, x])[-3:])


HARNESS_PROBE = """
const uint i = thread_position_in_grid.x;
const float v = x[i];
const float total = simd_sum(v);
const float swapped = simd_shuffle_xor(v, 5u);
scratch[i] = v * 2.0f;
threadgroup_barrier(mem_flags::mem_device);
const uint n = threads_per_threadgroup.x;
const uint base = threadgroup_position_in_grid.x * 64;
const float other = scratch[base + (thread_index_in_threadgroup + 32) % n];
if (i != 7) {
  out[i * 3 + 0] = total;
  out[i * 3 + 1] = swapped;
  out[i * 3 + 2] = other;
}
"""


@needs_harness
def test_harness_collectives_barriers_and_poison():
    """simd_sum / simd_shuffle_xor across lanes, a partial last threadgroup and simdgroup, a threadgroup barrier
    ordering device memory between simdgroups, and NaN left where the kernel writes nothing."""
    n = 80  # threadgroups of 64 and 16 threads: simdgroups of 32, 32 and 16 lanes
    x = np.arange(n, dtype=np.float32) * 0.25 + 1.0
    out, scratch = H.run_kernel(HARNESS_PROBE, [("x", x, "float32")],
                                [("out", (n, 3), "float32"), ("scratch", (n,), "float32")], [], (n, 1, 1),
                                (64, 1, 1))
    expected = np.zeros((n, 3), np.float32)
    for i in range(n):
        lo = i // 32 * 32
        lanes = x[lo:min(lo + 32, n)]
        expected[i, 0] = lanes.sum()
        partner = lo + ((i - lo) ^ 5)
        expected[i, 1] = x[partner] if partner < n else x[i]
        base, size = i // 64 * 64, min(64, n - i // 64 * 64)
        expected[i, 2] = 2 * x[base + (i - base + 32) % size]
    assert np.isnan(out[7]).all()
    expected[7] = out[7]
    np.testing.assert_allclose(out, expected, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(scratch, 2 * x)


@needs_harness
def test_harness_catches_out_of_bounds_writes():
    body = "out[thread_position_in_grid.x + 1] = 1.0f;"
    with pytest.raises(RuntimeError, match="write past the end"):
        H.run_kernel(body, [], [("out", (8,), "float32")], [], (8, 1, 1), (8, 1, 1))


@needs_harness
@pytest.mark.parametrize("tree", ["chain32", "fan16", "random24", "single"])
def test_harness_kernels_match_the_pure_mlx_twin(rng, tree):
    """The same node states and outputs as the engine's loop-free twin (recurrence.py)."""
    from ddtree_mlx.kernels.recurrence import tree_conv, tree_gated_delta
    from ddtree_mlx.tree.draft_tree import DraftTree

    parent = trees(rng)[tree]
    draft = DraftTree.root_only(0)
    for p in parent[1:]:
        draft.add(p, len(draft.tokens), 0)
    q, k, v, g, beta, state = gdn_inputs(rng, len(parent), **BIG)
    y, delta = H.run_tree_gated_delta(q, k, v, g, beta, state, parent)
    ancestors = mx.array(draft.ancestor_mask())
    twin_y, record = tree_gated_delta(*(mx.array(a) for a in (q, k, v, np.log(g), beta, state)), ancestors)
    close(y, np.array(twin_y), 1e-5, f"y vs twin, {tree}")
    close(delta, np.array(record.u.transpose(1, 0, 2)), 1e-5, f"delta vs twin, {tree}")
    close(committed_states(delta, k, g, state, parent), np.array(record.state_at(mx.arange(len(parent)))), 1e-5,
          f"states vs twin, {tree}")
    x, conv_state, weight = conv_inputs(rng, len(parent), C=64, K=4)
    out, windows = H.run_tree_conv1d(x, conv_state, weight, parent)
    index = mx.array(draft.window_index(4))
    twin_out, rows = tree_conv(mx.array(x), mx.array(conv_state), mx.array(weight), index)
    close(out, np.array(twin_out), 1e-5, f"conv vs twin, {tree}")
    np.testing.assert_array_equal(windows, np.array(rows[index[:, 1:]]))
