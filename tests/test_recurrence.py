"""The loop-free tree recurrence and tree conv vs mlx-lm's sequential versions along every root-to-node path."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.gated_delta import gated_delta_ops

from ddtree_mlx.kernels.recurrence import chain_gated_delta, tree_conv, tree_gated_delta
from ddtree_mlx.tree.draft_tree import DraftTree


def make_tree(shape, size, rng):
    tree = DraftTree.root_only(0)
    for node in range(1, size):
        parent = {"chain": node - 1, "fan": 0, "random": int(rng.integers(0, node))}[shape]
        tree.add(parent, node, 0)
    return tree


CASES = [("chain", 1), ("chain", 24), ("fan", 16), ("random", 20), ("random", 33)]


def inputs(rng, size, hk=2, hv=4, dk=16, dv=8):
    normal = lambda *s: mx.array(rng.normal(size=s).astype(np.float32))
    q, k = normal(size, hk, dk), normal(size, hk, dk)
    q, k = q / mx.linalg.norm(q, axis=-1, keepdims=True) * dk**-0.5, k / mx.linalg.norm(k, axis=-1, keepdims=True)
    log_g = mx.array(-rng.exponential(0.5, size=(size, hv)).astype(np.float32))
    beta = mx.array(rng.uniform(0, 1, size=(size, hv)).astype(np.float32))
    return q, k, normal(size, hv, dv), log_g, beta, normal(hv, dv, dk)


def sequential(q, k, v, log_g, beta, state, path):
    index = mx.array(path)
    y, state = gated_delta_ops(q[index][None], k[index][None], v[index][None], mx.exp(log_g[index])[None],
                               beta[index][None], state[None])
    return y[0, -1], state[0]


def assert_close(a, b):
    np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,size", CASES)
@pytest.mark.parametrize("heads", [(2, 4), (4, 4)])
def test_tree_recurrence_matches_each_path(shape, size, heads):
    rng = np.random.default_rng(size)
    tree = make_tree(shape, size, rng)
    q, k, v, log_g, beta, state0 = inputs(rng, size, hk=heads[0], hv=heads[1])
    y, record = tree_gated_delta(q, k, v, log_g, beta, state0, mx.array(tree.ancestor_mask()))
    states = record.state_at(mx.arange(size))
    chain_y, replay = chain_gated_delta(q, k, v, log_g, beta, state0, tree)
    for node in range(size):
        want_y, want_state = sequential(q, k, v, log_g, beta, state0, tree.path_to(node))
        assert_close(y[node], want_y)
        assert_close(states[node], want_state)
        assert_close(chain_y[node], want_y)
    last = mx.array([size - 1])
    assert_close(replay.state_at(last), record.state_at(last))


def test_recurrence_survives_decays_that_underflow():
    rng = np.random.default_rng(0)
    q, k, v, _, beta, state0 = inputs(rng, 6)
    log_g = mx.full((6, 4), -200.0)  # exp() is 0 in float32: log space must not produce NaN
    tree = make_tree("chain", 6, rng)
    y, record = tree_gated_delta(q, k, v, log_g, beta, state0, mx.array(tree.ancestor_mask()))
    want_y, want_state = sequential(q, k, v, log_g, beta, state0, tree.path_to(5))
    assert_close(y[5], want_y)
    assert_close(record.state_at(mx.array([5]))[0], want_state)


@pytest.mark.parametrize("shape,size", CASES)
def test_tree_conv_matches_each_path(shape, size):
    rng = np.random.default_rng(size)
    tree = make_tree(shape, size, rng)
    channels, width = 24, 4
    x = mx.array(rng.normal(size=(size, channels)).astype(np.float32))
    cached = mx.array(rng.normal(size=(width - 1, channels)).astype(np.float32))
    conv = nn.Conv1d(channels, channels, kernel_size=width, groups=channels, bias=False)
    out, rows = tree_conv(x, cached, conv.weight, mx.array(tree.window_index(width)))
    windows = rows[mx.array(tree.window_index(width))]
    for node in range(size):
        sequence = mx.concatenate([cached, x[mx.array(tree.path_to(node))]], axis=0)[None]
        assert_close(out[node], nn.silu(conv(sequence))[0, -1])
        assert_close(windows[node, 1:], sequence[0, -(width - 1):])


def test_bfloat16_pieces_round_exactly_as_mlx_lm():
    """In bf16 the tree conv is mlx-lm's conv1d on each node's window and the decay is mlx-lm's compute_g, bit for
    bit: rounding differences here would move near-ties in every verify."""
    from mlx_lm.models.gated_delta import compute_g

    from ddtree_mlx.kernels.recurrence import log_decay

    rng = np.random.default_rng(7)
    tree = make_tree("random", 12, rng)
    channels, width = 40, 4
    x = mx.array(rng.normal(size=(12, channels))).astype(mx.bfloat16)
    cached = mx.array(rng.normal(size=(width - 1, channels))).astype(mx.bfloat16)
    conv = nn.Conv1d(channels, channels, kernel_size=width, groups=channels, bias=False)
    conv.set_dtype(mx.bfloat16)
    out, _ = tree_conv(x, cached, conv.weight, mx.array(tree.window_index(width)))
    for node in range(12):
        sequence = mx.concatenate([cached, x[mx.array(tree.path_to(node))]], axis=0)[None]
        assert mx.array_equal(out[node], nn.silu(conv(sequence))[0, -1]).item()
    a = mx.array(rng.normal(size=(12, 4)) * 3).astype(mx.bfloat16)
    A_log = mx.array(rng.normal(size=(4,))).astype(mx.bfloat16)
    dt_bias = mx.array(rng.normal(size=(4,))).astype(mx.bfloat16)
    assert mx.array_equal(mx.exp(log_decay(a, A_log, dt_bias)), compute_g(A_log, a, dt_bias)).item()


def test_a_forest_matches_each_rows_paths():
    """A batch's trees in one conv and one solve (the twin's forest path), each row from its own window and state:
    every node's output, new window and state equal mlx-lm's sequential conv and recurrence along its row's path."""
    from ddtree_mlx.config import DDTreeConfig
    from ddtree_mlx.kernels import dispatch
    from ddtree_mlx.models.verify import Forest, TreeInputs

    rng = np.random.default_rng(7)
    trees = [make_tree("random", 7, rng), make_tree("chain", 1, rng), make_tree("fan", 5, rng)]
    rows = [inputs(rng, len(tree)) for tree in trees]
    q, k, v, log_g, beta = (mx.concatenate([row[part] for row in rows]) for part in range(5))
    states0 = [row[5] for row in rows]
    forest = Forest([TreeInputs.build(tree, 10, DDTreeConfig()) for tree in trees])
    a, zero = mx.log(mx.exp(-log_g) - 1), mx.zeros(4)  # log_decay(a, A_log = 0, dt_bias = 0) is log_g again
    y, records = dispatch.forest_gated_delta(q, k, v, a, beta, zero, zero, states0, forest)
    channels, width = 24, 4
    x = mx.array(rng.normal(size=(len(y), channels)).astype(np.float32))
    cached = [mx.array(rng.normal(size=(width - 1, channels)).astype(np.float32)) for _ in trees]
    conv = nn.Conv1d(channels, channels, kernel_size=width, groups=channels, bias=False)
    out, windows = dispatch.forest_conv(x, cached, conv.weight, forest)
    assert all(inputs.kernels == {"twin"} for inputs in forest.rows)
    for tree, span, state0, record, window, row_windows in zip(trees, forest.spans, states0, records, cached, windows):
        states = record.state_at(mx.arange(len(tree)))
        for node in range(len(tree)):
            path = [span.start + n for n in tree.path_to(node)]
            want_y, want_state = sequential(q, k, v, log_g, beta, state0, path)
            assert_close(y[span.start + node], want_y)
            assert_close(states[node], want_state)
            sequence = mx.concatenate([window, x[mx.array(path)]], axis=0)[None]
            assert_close(out[span.start + node], nn.silu(conv(sequence))[0, -1])
            assert_close(row_windows.window_at(node), sequence[0, -(width - 1):])
