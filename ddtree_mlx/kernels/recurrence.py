"""Pure-MLX tree forms of the GatedDeltaNet pieces: the short causal conv and the gated-delta recurrence.

Both fork every draft-tree node from its parent, with no Python loop over nodes or depths.

Recurrence, per value head (S is Dv x Dk, float32):  S_t = g_t S_p + u_t k_t^T,  u_t = beta_t (v_t - g_t S_p k_t),
y_t = S_t q_t, where p is t's parent. Unrolled along the root-to-t path with Gamma_t = prod of g over the path:

    u_t + beta_t sum_{s proper ancestor of t} (Gamma_t / Gamma_s)(k_t . k_s) u_s = beta_t (v_t - Gamma_t S_0 k_t)
    y_t = Gamma_t S_0 q_t + sum_{s ancestor-or-self of t} (Gamma_t / Gamma_s)(q_t . k_s) u_s

Nodes are numbered parents-first, so the system is unit lower-triangular: one solve gives every node's u.
Decays are kept in log space because g underflows to 0 on real models.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.gated_delta import gated_delta_kernel, gated_delta_ops

from ..tree.draft_tree import DraftTree


def tree_conv(x: mx.array, cached: mx.array, weight: mx.array, window_index: mx.array) -> tuple[mx.array, mx.array]:
    """Depthwise causal conv over each node's ancestors, SiLU fused.

    x [T, C] node inputs, cached [K-1, C] the conv window before the root, weight [C, K, 1] (mlx-lm's conv1d
    layout, oldest tap first), window_index [T, K] rows of concat(cached, x) (see DraftTree.window_index).
    Returns (out [T, C], rows) where rows = concat(cached, x) is what a commit gathers a node's new conv window
    from. Each node's window is one batch row of the same mx.conv1d mlx-lm runs, so bf16 rounds as it does.
    """
    rows = mx.concatenate([cached.astype(x.dtype), x], axis=0)
    out = mx.conv1d(rows[window_index], weight, groups=x.shape[1])  # [T, 1, C]: one valid output per window
    return nn.silu(out[:, 0]), rows


def log_decay(a: mx.array, A_log: mx.array, dt_bias: mx.array) -> mx.array:
    """log g = -exp(A_log) * softplus(a + dt_bias), taken directly. As mlx-lm's compute_g: softplus in the
    model's dtype, the product in float32."""
    return -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias)


def _heads_first(x: mx.array, heads: int) -> mx.array:
    """[.., T, H, D] -> [.., heads, T, D] float32, repeating key heads for GQA as mlx-lm does (hv -> hv // (Hv/Hk))."""
    if x.shape[-2] != heads:
        x = mx.repeat(x, heads // x.shape[-2], axis=-2)
    return x.astype(mx.float32).swapaxes(-3, -2)


def _unit_lower_solve(strict: mx.array, rhs: mx.array) -> mx.array:
    """Solve (I + N) x = rhs, N strictly lower triangular [.., T, T] (so N^T = 0).

    (I + N)^-1 = (I - N)(I + N^2)(I + N^4)...: log2(T) matmuls, no solver (which MLX runs only on the CPU).
    N only links ancestors, so N^(depth+1) is already 0; the extra factors cost a few tiny matmuls."""
    x = rhs - strict @ rhs
    power, reach = strict, 1
    while 2 * reach < strict.shape[-1]:
        power = power @ power
        x = x + power @ x
        reach *= 2
    return x


def _path_decay(log_gamma_rows: mx.array, log_gamma: mx.array, mask: mx.array) -> mx.array:
    """Gamma_t / Gamma_s where mask[t, s], else 0. Exponents are <= 0 on the mask (decays only shrink)."""
    diff = log_gamma_rows[..., :, None] - log_gamma[..., None, :]
    return mx.where(mask, mx.exp(mx.where(mask, diff, 0.0)), 0.0)


@mx.compile
def _states(u: mx.array, k: mx.array, log_gamma: mx.array, state0: mx.array, rows: mx.array, nodes: mx.array):
    gamma = log_gamma[:, nodes]  # [Hv, n]
    weight = _path_decay(gamma, log_gamma, rows)  # [Hv, n, T]
    carried = mx.exp(gamma)[..., None, None] * state0[:, None]
    added = u.swapaxes(1, 2)[:, None] @ (weight[..., None] * k[:, None])
    return (carried + added).transpose(1, 0, 2, 3)


def _log_gamma(ancestors: mx.array, log_g: mx.array) -> mx.array:
    """log Gamma [.., Hv, T]: the summed log decays along each node's root path (log_g [.., T, Hv])."""
    return (ancestors.astype(mx.float32) @ log_g.astype(mx.float32)).swapaxes(-1, -2)


@dataclass
class TreeRecurrence:
    """What a commit needs to rebuild any node's state: no per-node state is stored."""

    u: mx.array  # [Hv, T, Dv]
    k: mx.array  # [Hv, T, Dk]
    log_gamma: mx.array  # [Hv, T]
    state0: mx.array  # [Hv, Dv, Dk] float32
    ancestors: mx.array  # [T, T] bool, ancestor-or-self

    def state_at(self, nodes: mx.array) -> mx.array:
        """States after the given nodes: [len(nodes), Hv, Dv, Dk] float32, one matmul per head."""
        return _states(self.u, self.k, self.log_gamma, self.state0, self.ancestors[nodes], nodes)


@mx.compile
def _solve(q, k, v, log_g, beta, state0, ancestors):
    """Fused (one graph per tree size, or per forest's rows and padded size): see the module docstring for the
    math. One tree: q, k [T, Hk, Dk], v [T, Hv, Dv], log_g and beta [T, Hv], state0 [Hv, Dv, Dk], ancestors [T, T];
    a forest's rows add a leading axis to each."""
    heads = v.shape[-2]
    q, k, vh = _heads_first(q, heads), _heads_first(k, heads), _heads_first(v, heads)
    beta = beta.astype(mx.float32).swapaxes(-1, -2)[..., None]  # [.., Hv, T, 1]
    log_gamma = _log_gamma(ancestors, log_g)
    decay = _path_decay(log_gamma, log_gamma, mx.expand_dims(ancestors, -3))  # [.., Hv, T, T], ancestor-or-self
    strict = decay * (1.0 - mx.eye(decay.shape[-1]))
    carried = mx.exp(log_gamma)[..., None]  # [.., Hv, T, 1]
    state_t = state0.swapaxes(-1, -2)  # [.., Hv, Dk, Dv]
    u = _unit_lower_solve(beta * strict * (k @ k.swapaxes(-1, -2)), beta * (vh - carried * (k @ state_t)))
    y = carried * (q @ state_t) + (decay * (q @ k.swapaxes(-1, -2))) @ u
    return y.swapaxes(-3, -2).astype(v.dtype), u, k, log_gamma


@dataclass
class RowLayout:
    """A forest's packed nodes laid out [rows, nodes] and back, so each row's tree is solved from its own state in
    one batched solve (its cost grows with the rows, not with the square of all their nodes)."""

    pad: mx.array  # [rows * nodes]: the packed node at each place (a short row repeats its last node)
    unpad: mx.array  # [T]: each packed node's place
    ancestors: mx.array  # [rows, nodes, nodes] bool: each row's tree's; a padding node sees only itself
    nodes: int

    @classmethod
    def of(cls, trees: list[DraftTree]) -> "RowLayout":
        sizes = [len(tree) for tree in trees]
        nodes, starts = max(sizes), np.cumsum([0, *sizes[:-1]])
        pad = np.array([start + min(i, size - 1) for start, size in zip(starts, sizes) for i in range(nodes)])
        unpad = np.concatenate([row * nodes + np.arange(size) for row, size in enumerate(sizes)])
        ancestors = np.stack([np.eye(nodes, dtype=bool)] * len(trees))
        for mask, tree in zip(ancestors, trees):
            mask[: len(tree), : len(tree)] = tree.ancestor_mask()
        return cls(mx.array(pad.astype(np.int32)), mx.array(unpad.astype(np.int32)), mx.array(ancestors), nodes)

    def rows(self, x: mx.array) -> mx.array:
        """Packed [T, ...] -> [rows, nodes, ...]."""
        return x[self.pad].reshape(-1, self.nodes, *x.shape[1:])

    def packed(self, x: mx.array) -> mx.array:
        """[rows, nodes, ...] -> packed [T, ...]."""
        return x.reshape(-1, *x.shape[2:])[self.unpad]


def forest_gated_delta(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array, states0: mx.array,
                       layout: RowLayout) -> tuple[mx.array, list[TreeRecurrence]]:
    """Several rows' trees at once, each from its own state: tree_gated_delta's inputs for a forest's packed nodes
    and states0 [rows, Hv, Dv, Dk]. Returns y [T, Hv, Dv] and each row's commit record (its own tree's, as
    tree_gated_delta would give it)."""
    states0 = states0.astype(mx.float32)
    y, u, k, log_gamma = _solve(*map(layout.rows, (q, k, v, log_g, beta)), states0, layout.ancestors)
    return layout.packed(y), [TreeRecurrence(*row, ancestors) for *row, ancestors in
                              zip(u, k, log_gamma, states0, layout.ancestors)]


def tree_gated_delta(q: mx.array, k: mx.array, v: mx.array, log_g: mx.array, beta: mx.array, state0: mx.array,
                     ancestors: mx.array) -> tuple[mx.array, TreeRecurrence]:
    """q, k [T, Hk, Dk] (normalized, q scaled), v [T, Hv, Dv], log_g and beta [T, Hv], state0 [Hv, Dv, Dk],
    ancestors [T, T] bool ancestor-or-self. Returns y [T, Hv, Dv] (v's dtype) and the commit record."""
    state0 = state0.astype(mx.float32)
    y, u, k, log_gamma = _solve(q, k, v, log_g, beta, state0, ancestors)
    return y, TreeRecurrence(u=u, k=k, log_gamma=log_gamma, state0=state0, ancestors=ancestors)


def delta_record(delta: mx.array, k: mx.array, log_g: mx.array, state0: mx.array,
                 ancestors: mx.array) -> TreeRecurrence:
    """The commit record from each node's delta u [T, Hv, Dv] (what the Metal kernel writes besides y), k
    [T, Hk, Dk] and log_g [T, Hv]: the same closed form the solve's record uses, so no node state is kept."""
    heads = delta.shape[1]
    return TreeRecurrence(u=delta.transpose(1, 0, 2), k=_heads_first(k, heads), log_gamma=_log_gamma(ancestors, log_g),
                          state0=state0.astype(mx.float32), ancestors=ancestors)


def chain_step(q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array):
    """mlx-lm's own sequential recurrence over a chain: inputs [n, ...], state [Hv, Dv, Dk]."""
    step = gated_delta_kernel if mx.metal.is_available() and mx.default_device() == mx.gpu else gated_delta_ops
    y, state = step(q[None], k[None], v[None], g[None], beta[None], state[None])
    return y[0], state[0]


def chain_segments(parents: list[int]) -> list[list[int]]:
    """Split parents-first nodes into chains: a chain continues through nodes with exactly one child.
    Every chain starts at the root or at a child of a branching node, whose state is a chain end."""
    child_count = [0] * len(parents)
    for parent in parents[1:]:
        child_count[parent] += 1
    segments: list[list[int]] = []
    open_chain: dict[int, list[int]] = {}  # last node of a chain that may continue -> the chain
    for node, parent in enumerate(parents):
        chain = open_chain.pop(parent, None) if parent >= 0 and child_count[parent] == 1 else None
        if chain is None:
            chain = []
            segments.append(chain)
        chain.append(node)
        open_chain[node] = chain
    return segments


@dataclass
class ReplayRecurrence:
    """Keeps only the per-node inputs; a commit replays the accepted path (a few recurrence steps)."""

    q: mx.array
    k: mx.array
    v: mx.array
    g: mx.array
    beta: mx.array
    state0: mx.array
    tree: DraftTree

    def state_at(self, nodes: mx.array) -> mx.array:
        states = []
        for node in nodes.tolist():
            path = mx.array(self.tree.path_to(node))
            states.append(chain_step(self.q[path], self.k[path], self.v[path], self.g[path], self.beta[path],
                                     self.state0)[1])
        return mx.stack(states)


def chain_gated_delta(q, k, v, log_g, beta, state0, tree: DraftTree) -> tuple[mx.array, ReplayRecurrence]:
    """DDTREE_TREE_AWARE_LINEAR=0: run mlx-lm's chain recurrence segment by segment in parents-first order,
    starting each segment from its branching parent's state (the fix-up)."""
    g = mx.exp(log_g)
    state0 = state0.astype(mx.float32)
    ends = {-1: state0}
    y = mx.zeros(v.shape, v.dtype)
    parents = tree.parents
    for chain in chain_segments(parents):
        index = mx.array(chain)
        y[index], ends[chain[-1]] = chain_step(q[index], k[index], v[index], g[index], beta[index],
                                               ends[parents[chain[0]]])
    return y, ReplayRecurrence(q, k, v, g, beta, state0, tree)
