"""Qwen 3.5 / 3.6 hybrid targets (mlx-lm `qwen3_5`, `qwen3_5_moe`): GatedDeltaNet layers plus gated attention.

The recurrent layers fork their short causal conv and their gated-delta state per tree branch; the commit
installs the last accepted node's conv window and state (no per-node state is kept, see recurrence.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_ssm_mask
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import normalize_qk

from ..kernels import dispatch as kernels
from ..kernels.check import ConvShape, DeltaShape, Shape
from ..kernels.dispatch import dtype_name
from .adapter import TargetAdapter
from .attention import forest_attention
from .batch_cache import RowArrays
from .verify import Capture, Forest


@dataclass
class RecurrentCapture:
    windows: kernels.ConvWindows  # window_at(node) -> [K-1, C]
    states: Any  # state_at(nodes) -> [n, Hv, Dv, Dk]

    def commit(self, cache_entry: ArraysCache, path: mx.array) -> None:
        last = path[-1:]
        cache_entry[0] = self.windows.window_at(last[0])[None]
        cache_entry[1] = self.states.state_at(last)


class StepWritten:
    """A plain batched step's recurrent layer: its lone root's window and state are in the row's cache already (a
    lone root is always accepted)."""

    def commit(self, cache_entry: ArraysCache, path: mx.array) -> None:
        pass


class Qwen3_5Adapter(TargetAdapter):
    @staticmethod
    def text_model(model: Any) -> Any:
        return model.language_model

    def mixer_kind(self, layer: Any) -> str:
        return "linear" if layer.is_linear else "attention"

    def kernel_shapes(self) -> tuple[Shape, ...]:
        """The tree conv and recurrence as this target runs them: the GatedDeltaNet layer's own head counts and
        sizes (this rank's share, when sharded) and the activations' dtype."""
        gdn = next((layer.linear_attn for layer in self.layers if layer.is_linear), None)
        if gdn is None:  # a pipeline stage of attention layers only
            return ()
        dtype = dtype_name(self.embed(mx.array([0])))
        return (DeltaShape(gdn.num_k_heads, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim, dtype),
                ConvShape(gdn.conv_dim, gdn.conv_kernel_size, dtype))

    def layer_mask(self, layer: Any, hidden: mx.array, cache_entry: Any) -> Any:
        if layer.is_linear:
            return create_ssm_mask(hidden, cache_entry)
        return super().layer_mask(layer, hidden, cache_entry)

    def mixer_tree(self, layer: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        if layer.is_linear:
            return self.recurrent_tree(layer.linear_attn, x, entries, forest)
        return self.attention_tree(layer.self_attn, x, entries, forest)

    def attention_tree(self, attn: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        length = x.shape[1]
        queries, gate = mx.split(attn.q_proj(x).reshape(1, length, attn.num_attention_heads, -1), 2, axis=-1)
        keys = attn.k_proj(x).reshape(1, length, attn.num_key_value_heads, -1)
        values = attn.v_proj(x).reshape(1, length, attn.num_key_value_heads, -1)
        queries = attn.q_norm(queries).transpose(0, 2, 1, 3)
        keys = attn.k_norm(keys).transpose(0, 2, 1, 3)
        out, captures = forest_attention(attn, queries, keys, values.transpose(0, 2, 1, 3), entries, forest)
        return attn.o_proj(out * mx.sigmoid(gate.reshape(1, length, -1))), captures

    def recurrent_tree(self, gdn: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        """A batch's lone roots as one plain step over its stacked arrays (recurrent_step), the trees' rows as
        recurrent_rows; rows not held in a batch's arrays all as recurrent_rows."""
        stepped = forest.stepped()
        if stepped is None or not all(isinstance(entry, RowArrays) for entry in entries):
            return self.recurrent_rows(gdn, x, entries, forest)
        if not stepped.trees:
            return self.recurrent_step(gdn, x, entries)
        out, step_captures = self.recurrent_step(gdn, x[:, stepped.step_nodes], [entries[r] for r in stepped.steps])
        grown, tree_captures = self.recurrent_rows(gdn, x[:, stepped.tree_nodes], [entries[r] for r in stepped.trees],
                                                   stepped.tree_forest)
        captures = dict(zip(stepped.steps + stepped.trees, step_captures + tree_captures))
        return mx.concatenate([out, grown], axis=1)[:, stepped.back], [captures[row] for row in range(len(entries))]

    def recurrent_rows(self, gdn: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        """Projections, q/k normalization and the output over every row's nodes at once; the conv and the
        recurrence of each row from its own cached window and state (the twin: all rows in one; kernels: per row)."""
        length = x.shape[1]
        clock = forest.clock
        qkv = clock.detail("linear.proj", gdn.in_proj_qkv(x)[0])
        a, beta = clock.detail("linear.proj", (gdn.in_proj_a(x)[0], mx.sigmoid(gdn.in_proj_b(x)[0])))
        windows = [self.window_of(gdn, entry, qkv.dtype) for entry in entries]
        conv_out, conv_windows = clock.detail("linear.conv", kernels.forest_conv(qkv, windows, gdn.conv1d.weight, forest))
        q, k, v = mx.split(conv_out, [gdn.key_dim, 2 * gdn.key_dim], axis=-1)
        q = q.reshape(length, gdn.num_k_heads, gdn.head_k_dim)
        k = k.reshape(length, gdn.num_k_heads, gdn.head_k_dim)
        v = v.reshape(length, gdn.num_v_heads, gdn.head_v_dim)
        q, k = normalize_qk(q, k, inv_scale=gdn.head_k_dim**-0.5, eps=1e-6)
        states0 = [self.state_of(gdn, entry) for entry in entries]
        y, states = kernels.forest_gated_delta(q, k, v, a, beta, gdn.A_log, gdn.dt_bias, states0, forest)
        y = clock.detail("linear.recurrence", y)
        z = gdn.in_proj_z(x).reshape(1, length, gdn.num_v_heads, gdn.head_v_dim)
        out = gdn.out_proj(gdn.norm(y[None], z).reshape(1, length, -1))
        if getattr(gdn, "sharding_group", None) is not None:  # tensor parallel: each rank holds some heads' share
            out = mx.distributed.all_sum(out, group=gdn.sharding_group)
        return out, [RecurrentCapture(row_windows, row_states) for row_windows, row_states in zip(conv_windows, states)]

    def recurrent_step(self, gdn: Any, x: mx.array, entries: list[RowArrays]) -> tuple[mx.array, list[Capture]]:
        """A plain batched step ([1, rows, hidden], one token a row): mlx-lm's own GatedDeltaNet over the rows'
        stacked windows and states, as its batch step runs it, written back in place. All the batch's rows in
        order run on the layer's arrays themselves; some of them, on their rows taken out and put back. Per row,
        the synthetic hybrid's plain batched steps at 8 rows ran at 0.70x mlx-lm's batch here, stacked at 1.13x."""
        layer, rows = entries[0].layer, [entry.slot.index for entry in entries]
        whole = rows == list(range(layer.rows))
        stacked = layer if whole else ArraysCache(len(layer.cache))
        if not whole:
            taken = mx.array(rows)
            stacked.cache = [part[taken] for part in layer.cache]
        out = gdn(x.reshape(-1, 1, x.shape[-1]), cache=stacked)
        if not whole:
            for part, new in zip(layer.cache, stacked.cache):
                part[taken] = new
        return out.reshape(1, -1, out.shape[-1]), [StepWritten() for _ in entries]

    @staticmethod
    def window_of(gdn: Any, cache_entry: Any, dtype: mx.Dtype) -> mx.array:
        """The row's cached conv window [K-1, C] (zeros before it has read anything)."""
        if cache_entry[0] is not None:
            return cache_entry[0][0]
        return mx.zeros((gdn.conv_kernel_size - 1, gdn.conv_dim), dtype)

    def state_of(self, gdn: Any, cache_entry: Any) -> mx.array:
        return cache_entry[1][0] if cache_entry[1] is not None else self.zero_state(gdn)

    @staticmethod
    def zero_state(gdn: Any) -> mx.array:
        return mx.zeros((gdn.num_v_heads, gdn.head_v_dim, gdn.head_k_dim), dtype=mx.float32)
