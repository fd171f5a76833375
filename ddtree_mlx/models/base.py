"""What every target family shares: the plain forward with hidden-state capture, the tree verify loop, and
attention over [prefix, tree] with ancestor-only visibility inside the tree.

A family file supplies only how one layer's token mixer (attention or recurrence) runs over a tree. Each mixer
returns a capture that knows how to commit the accepted path into its own cache entry, so neither this file nor
the generation loop knows which family or layer type it runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import rope_utils
from mlx_lm.models.base import create_attention_mask, quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .. import cpu_exp
from ..config import DDTreeConfig
from ..distributed import Stage, gather_last_axis, pipeline_stage, sharding_group
from ..kernels import LevelPlan
from ..tree import DraftTree


class Capture(Protocol):
    def commit(self, cache_entry: Any, path: mx.array) -> None:
        """Install the state after the accepted path (node indices, root first) into the layer's cache."""


@dataclass
class TreeInputs:
    """Per-verify tables shared by all layers."""

    tree: DraftTree
    parents: mx.array  # [T] int32, -1 for the root
    positions: mx.array  # [T] int32: prefix length + depth
    ancestors: mx.array  # [T, T] bool, ancestor-or-self
    prefix_len: int
    config: DDTreeConfig
    clock: "PartClock"
    conv_windows: dict[int, mx.array]  # kernel width -> [T, width] rows of concat(cached, nodes)
    mask: mx.array | None = None
    plan: LevelPlan | None = None
    step: bool = False  # a plain step (TargetAdapter.lone_root): keys and values go straight into the cache
    kernels: set[str] = field(default_factory=set)  # what the recurrent layers ran as: "metal" and/or "twin"

    @classmethod
    def build(cls, tree: DraftTree, prefix_len: int, config: DDTreeConfig) -> "TreeInputs":
        return cls(
            tree=tree,
            parents=mx.array(np.asarray(tree.parents, dtype=np.int32)),
            positions=mx.array(np.asarray(tree.depths, dtype=np.int32) + prefix_len),
            ancestors=mx.array(tree.ancestor_mask()),
            prefix_len=prefix_len,
            config=config,
            clock=PartClock(config.profile_verify, config.profile_detail),
            conv_windows={},
        )

    def attention_mask(self) -> mx.array | None:
        """[T, prefix + T] bool: the prefix fully visible, ancestors inside the tree. Built on the device, once
        per verify, and only if a layer asks (the split attention does not). A lone root sees everything: no
        mask, exactly mlx-lm's one-token step."""
        if len(self.tree) == 1:
            return None
        if self.mask is None:
            self.mask = mx.concatenate([mx.ones((len(self.tree), self.prefix_len), mx.bool_), self.ancestors], 1)
        return self.mask

    def level_plan(self) -> LevelPlan:
        """The Metal recurrence's level schedule, built once per verify (not once per layer)."""
        if self.plan is None:
            self.plan = LevelPlan.of(self.tree.parents)
        return self.plan

    def window_index(self, width: int) -> mx.array:
        if width not in self.conv_windows:
            self.conv_windows[width] = mx.array(self.tree.window_index(width))
        return self.conv_windows[width]


@dataclass
class VerifyOutput:
    logits: mx.array  # [T, V]
    hidden: mx.array | None  # [T, F]: concatenated hidden states of the requested layers (None if none)
    captures: list[Capture]
    profile: dict[str, float] = field(default_factory=dict)  # seconds per layer part, with profile_verify
    kernels: set[str] = field(default_factory=set)
    committed: bool = False  # the root was run straight into the cache (a lone root): nothing left to commit
    started: float | None = None  # when the device first got part of this graph (EarlyStart), if it did
    waited: float = 0.0  # seconds that first hand-over blocked (EarlyStart.waited): the device's time


@dataclass
class KVCapture:
    keys: mx.array  # [1, Hkv, T, D], already rotated at the node's position
    values: mx.array

    def commit(self, cache_entry: KVCache, path: mx.array) -> None:
        cache_entry.update_and_fetch(self.keys[:, :, path], self.values[:, :, path])


# RoPE modules whose rotation depends only on each token's position, so rotating tree nodes at their own
# positions is what mlx-lm's step does. Others (dynamic NTK rescales its base by the sequence length) are refused.
POSITIONAL_ROPES = (nn.RoPE, rope_utils.Llama3RoPE, rope_utils.YarnRoPE, rope_utils.SuScaledRoPE,
                    rope_utils.ProportionalRoPE)


def check_rope(layers: list[Any]) -> None:
    for layer in layers:
        rope = getattr(getattr(layer, "self_attn", None), "rope", None)
        if rope is not None and not isinstance(rope, POSITIONAL_ROPES):
            raise ValueError(
                f"unsupported RoPE {type(rope).__name__}: tree verify rotates each node at its own position, which "
                "is only exact for position-only RoPE (default, linear, llama3, yarn, longrope); use a model config "
                "without this rope scaling"
            )


def rope_at(rope: Any, x: mx.array, positions: mx.array) -> mx.array:
    """Rotate each token at its own position: tokens go to the batch axis, where rope accepts an offset array."""
    return rope(x.transpose(2, 1, 0, 3), offset=positions).transpose(2, 1, 0, 3)


def tree_attention(attn: Any, queries: mx.array, keys: mx.array, values: mx.array, cache: KVCache,
                   inputs: TreeInputs) -> tuple[mx.array, KVCapture]:
    """queries [1, H, T, D], keys/values [1, Hkv, T, D] before RoPE. Returns attention output [1, T, H*D]."""
    if inputs.step:  # rotated and stored as mlx-lm's step does, then attended to in place
        queries, keys = attn.rope(queries, offset=cache.offset), attn.rope(keys, offset=cache.offset)
        out = step_attention(queries, cache.update_and_fetch(keys, values), attn.scale)
        return out.transpose(0, 2, 1, 3).reshape(1, 1, -1), KVCapture(keys, values)  # nothing left to commit
    queries = rope_at(attn.rope, queries, inputs.positions)
    keys = inputs.clock.detail("attention.proj_rope", rope_at(attn.rope, keys, inputs.positions))
    config = inputs.config
    if hasattr(cache, "bits"):  # a quantized KV cache: the nodes attend to keys and values as it stores them
        out = quantized_tree_attention(queries, keys, values, cache, attn.scale, inputs.attention_mask())
    elif splits(config, cache.offset):
        prefix = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        out = split_attention(queries, prefix, (keys, values), attn.scale, inputs.ancestors)
    else:
        all_keys, all_values = keys, values
        if cache.offset > 0:
            all_keys = mx.concatenate([cache.keys[..., : cache.offset, :], keys], axis=2)
            all_values = mx.concatenate([cache.values[..., : cache.offset, :], values], axis=2)
        out = mx.fast.scaled_dot_product_attention(
            queries, all_keys, all_values, scale=attn.scale, mask=inputs.attention_mask()
        )
    out = inputs.clock.detail("attention.sdpa", out)
    return out.transpose(0, 2, 1, 3).reshape(1, queries.shape[2], -1), KVCapture(keys, values)


def splits(config: DDTreeConfig, prefix: int) -> bool:
    """Whether verify attention after `prefix` cached tokens is split (split_attention). "auto" splits on the CPU:
    there it is faster from ~1K tokens of context (BENCHMARKS.md); on Metal it has not been measured against MLX's
    fused attention."""
    wanted = cpu_exp.on_cpu() if config.exact_tree_attention == "auto" else config.exact_tree_attention
    return wanted and prefix >= config.exact_tree_attention_min_prefix


def quantized_tree_attention(queries: mx.array, keys: mx.array, values: mx.array, cache: Any, scale: float,
                             mask: mx.array | None) -> mx.array:
    """mlx-lm's quantized attention over [the cached prefix, the tree's keys and values quantized per token]."""
    def with_tree(stored, new):
        quantized = mx.quantize(new, group_size=cache.group_size, bits=cache.bits)
        return tuple(mx.concatenate([part[..., : cache.offset, :], q], axis=2) for part, q in zip(stored, quantized))

    return quantized_scaled_dot_product_attention(queries, with_tree(cache.keys, keys), with_tree(cache.values, values),
                                                  scale=scale, mask=mask, group_size=cache.group_size, bits=cache.bits)


def split_attention(queries: mx.array, prefix: tuple[mx.array, mx.array], tree: tuple[mx.array, mx.array],
                    scale: float, ancestors: mx.array) -> mx.array:
    """Attention over [prefix, tree] as two parts merged exactly by their log-sum-exp (DDTREE_EXACT_TREE_ATTENTION).

    The prefix part needs no mask and reads the cache in place, so a long context is neither copied next to the
    tree's keys nor masked element by element; the tree part is a small T x T ancestor-masked block.
    queries [1, H, T, D]; prefix and tree (keys, values) [1, Hkv, *, D]. Softmax in float32, as MLX's own."""
    _, heads, length, dim = queries.shape
    q = grouped(queries, prefix[0].shape[1], scale)
    prefix_scores = q @ prefix[0].astype(mx.float32).swapaxes(-1, -2)  # [1, Hkv, rep*T, P]
    tree_scores = (q @ tree[0].astype(mx.float32).swapaxes(-1, -2)).reshape(*q.shape[:2], -1, length, length)
    tree_scores = mx.where(ancestors, tree_scores, -mx.inf).reshape(*q.shape[:2], -1, length)
    peak = mx.maximum(prefix_scores.max(-1, keepdims=True), tree_scores.max(-1, keepdims=True))
    exp = cpu_exp.exp if cpu_exp.on_cpu() else lambda x, shift: mx.exp(x - shift)  # MLX's CPU exp is slow
    prefix_weights, tree_weights = exp(prefix_scores, peak), exp(tree_scores, peak)
    total = prefix_weights.sum(-1, keepdims=True) + tree_weights.sum(-1, keepdims=True)
    out = (prefix_weights @ prefix[1].astype(mx.float32) + tree_weights @ tree[1].astype(mx.float32)) / total
    return out.reshape(1, heads, length, -1).astype(queries.dtype)


def step_attention(queries: mx.array, cached: tuple[mx.array, mx.array], scale: float) -> mx.array:
    """One token's attention over the whole cache (its own key and value already in), read in place: the prefix
    part of split_attention alone, with as few operations as that takes (at ~14 us an operation on the CPU, a
    second part to merge would cost a step more than the exp saves at ~1K tokens). queries [1, H, 1, D]."""
    keys, values = cached
    q = grouped(queries, keys.shape[1], scale)
    scores = q @ keys.astype(mx.float32).swapaxes(-1, -2)
    weights = cpu_exp.exp(scores, scores.max(-1, keepdims=True))
    out = (weights @ values.astype(mx.float32)) / weights.sum(-1, keepdims=True)
    return out.reshape(queries.shape).astype(queries.dtype)


def grouped(queries: mx.array, kv_heads: int, scale: float) -> mx.array:
    """Scaled float32 queries [1, H, T, D] as [1, Hkv, H / Hkv * T, D]: each key/value head's queries in one
    product with its keys."""
    _, heads, length, dim = queries.shape
    return (queries.astype(mx.float32) * scale).reshape(1, kv_heads, heads // kv_heads * length, dim)


class TargetAdapter:
    """Runs one mlx-lm target: plain forward (prefill, exact commit), tree verify, and the LM head."""

    def __init__(self, model: Any):
        self.model = model
        self.text = self.text_model(model)
        self.inner = self.text.model
        self.stage = pipeline_stage(self.inner)  # pipeline parallel: which layers this rank runs, else None
        # Sharded either way: the ranks' group (for decisions every rank must share), else None.
        self.group = sharding_group(model) or (self.stage.group if self.stage else None)
        check_rope(self.layers)

    @staticmethod
    def text_model(model: Any) -> Any:
        """The module holding `.model` (embed_tokens, layers, norm), `.args` and the LM head."""
        return model

    @property
    def args(self) -> Any:
        return self.text.args

    @property
    def layers(self) -> list[Any]:
        """The layers this process runs: all of them, or a pipeline stage's."""
        return self.inner.layers[self.stage.start : self.stage.end] if self.stage else self.inner.layers

    @property
    def first_layer(self) -> int:
        """The whole model's index of this process's first layer (0 unless a later pipeline stage)."""
        return self.stage.start if self.stage else 0

    @property
    def num_layers(self) -> int:
        """The whole model's layers, whichever this process runs (a drafter's tapped ids count in these)."""
        return self.args.num_hidden_layers

    # Sizes come from the model's args: a quantized embedding's weight is packed (hidden * bits / 32 columns).
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.args, "head_dim", None) or self.hidden_size // self.args.num_attention_heads

    @property
    def context_length(self) -> int | None:
        """The longest sequence the model was made for (None if its config does not say)."""
        return getattr(self.args, "max_position_embeddings", None)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.inner.embed_tokens(tokens)

    def lm_head(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.inner.embed_tokens.as_linear(hidden)
        logits = self.text.lm_head(hidden)
        group = getattr(self.text, "sharding_group", None)  # a vocabulary-sharded head (mlx-lm's qwen3_5 shard)
        return logits if group is None else gather_last_axis(logits, group)

    def head_rows(self, ids: mx.array) -> mx.array:
        """The LM head's rows for token `ids` [k] -> [k, hidden], dequantized: logits over part of the vocabulary
        without computing the rest."""
        if self.args.tie_word_embeddings:
            return self.inner.embed_tokens(ids)
        head = self.text.lm_head
        if isinstance(head, nn.QuantizedLinear):
            biases = head.biases[ids] if head.get("biases") is not None else None
            return mx.dequantize(head.weight[ids], head.scales[ids], biases, head.group_size, head.bits,
                                 mode=head.mode)
        return head.weight[ids]

    def make_cache(self) -> list[Any]:
        # A model we split into pipeline stages ourselves has no make_cache that knows it (mlx-lm's pipelined
        # qwen3_5 does); its stage's layers are plain attention layers, each with a KVCache.
        own = hasattr(self.model, "make_cache") and (self.stage is None or hasattr(self.inner, "pipeline"))
        return self.model.make_cache() if own else [KVCache() for _ in self.layers]

    def check_cache(self, cache: list[Any]) -> None:
        """Tree verify reads and appends plain or quantized KV caches; anything else would be silently wrong."""
        for entry in cache:
            if self.is_attention_cache(entry) and type(entry) not in (KVCache, QuantizedKVCache):
                raise ValueError(
                    f"unsupported KV cache {type(entry).__name__}: DDTree needs mlx_lm's KVCache (quantized with "
                    "kv_bits; no rotating or batched caches); build it with model.make_cache()"
                )

    @staticmethod
    def is_attention_cache(entry: Any) -> bool:
        return hasattr(entry, "offset") and hasattr(entry, "keys")

    def trim_attention(self, cache: list[Any], count: int) -> None:
        """Drop the newest `count` positions of every attention cache (a commit along a padded path, tree.Walk,
        appended them); recurrent entries took only the path's last node."""
        for entry in cache:
            if count and self.is_attention_cache(entry):
                entry.trim(count)

    def layer_mask(self, layer: Any, hidden: mx.array, cache_entry: Any) -> Any:
        return create_attention_mask(hidden, cache_entry)

    def logits(self, h: mx.array) -> mx.array:
        """The final norm and LM head: [n, hidden] -> [n, V]."""
        return self.lm_head(self.inner.norm(h))

    def forward(self, tokens: mx.array, cache: list[Any], capture_layers: list[int],
                early: EarlyStart | None = None, lone: TreeInputs | None = None) -> tuple[mx.array, mx.array | None]:
        """Plain causal forward of `tokens` [n] through the model's own layers, appending to the cache (`lone`:
        a one-token step whose attention layers run as `run_layer` says).
        Returns the last layer's output [n, hidden] (before the final norm; no LM head, so a long prompt never
        materialises [n, V] logits) and the requested layers' outputs concatenated [n, F] (None if none)."""
        h = self.embed(tokens[None])
        masks = {}
        captured = {}
        early = early or EarlyStart()
        h = receive(self.stage, h)
        for index, (layer, entry) in enumerate(zip(self.layers, cache), self.first_layer):
            kind = self.mixer_kind(layer)
            if kind not in masks:
                masks[kind] = self.layer_mask(layer, h, entry)
            h = early(index, self.run_layer(layer, h, masks[kind], entry, lone), self)
            if index in capture_layers:
                captured[index] = h
        h, hidden = pass_on(self.stage, h, captured, capture_layers, cache[-1])
        return h[0], hidden

    def run_layer(self, layer: Any, h: mx.array, mask: Any, entry: Any, lone: TreeInputs | None) -> mx.array:
        """mlx-lm's layer; or, for an attention layer of a `lone` step, the layer as a lone root's verify whose
        keys and values go straight into the cache, its attention `step_attention`."""
        if lone is None or self.mixer_kind(layer) != "attention":
            return layer(h, mask, entry)
        return self.tree_layer(layer, h, entry, lone)[0]  # its keys and values are in the cache already

    def tree_layer(self, layer: Any, h: mx.array, entry: Any, inputs: TreeInputs) -> tuple[mx.array, Capture]:
        """One layer over a tree's rows: the token mixer as the family runs it over a tree, then the layer's MLP."""
        mixed, capture = self.mixer_tree(layer, layer.input_layernorm(h), entry, inputs)
        h = inputs.clock.lap(self.mixer_kind(layer), h + mixed)
        return inputs.clock.lap("mlp", h + layer.mlp(layer.post_attention_layernorm(h))), capture

    def prefill(self, tokens: list[int], cache: list[Any], capture_layers: list[int], chunk: int,
                after_chunk: Callable[[list[Any]], None] | None = None, snapshots: Sequence[int] = (),
                snapshot: Callable[[int, mx.array | None], None] | None = None) -> tuple[mx.array, mx.array | None]:
        """mlx-lm's prefill: all but the last token in chunks of `chunk`, evaluated chunk by chunk with no LM
        head; then the last token alone, whose logits [1, V] are the only ones computed. The rounding is then
        the same as mlx-lm's own (same chunks, same one-token step), and memory is bounded by a chunk.
        Returns those logits and the captured hidden states of every prompt token [n, F] (None if none).
        `after_chunk` sees the cache after every model call (mlx-lm quantizes its KV cache there); `snapshot(n,
        hidden)` is called once the first n tokens are in, for each n in `snapshots` below the last token (a chunk
        ends there too), with their captured states."""
        after_chunk = after_chunk or (lambda cache: None)
        body = len(tokens) - 1
        marks = {n for n in snapshots if 0 < n <= body}
        ends = sorted({*range(chunk, body, chunk), *marks, body} - {0})
        captured, start = [], 0
        for end in ends:
            _, hidden = self.forward(mx.array(tokens[start:end]), cache, capture_layers)
            after_chunk(cache)
            mx.eval(hidden, [entry.state for entry in cache])
            captured.append(hidden)
            mx.clear_cache()
            start = end
            if end in marks and snapshot is not None:
                snapshot(end, None if hidden is None else mx.concatenate(captured))
        body = mx.concatenate(captured) if captured and captured[0] is not None else None
        h, hidden = self.forward(mx.array(tokens[-1:]), cache, capture_layers)
        after_chunk(cache)
        return self.logits(h), join_rows(body, hidden)

    def verify(self, tree: DraftTree, cache: list[Any], capture_layers: list[int], config: DDTreeConfig) -> VerifyOutput:
        """One forward over [root, nodes...]: the prefix fully visible, ancestors only inside the tree.
        Leaves the cache untouched; the captures commit the accepted path later. A lone root (plain decoding, or
        no draft this cycle) is always accepted: it runs as the model's own step, straight into the cache."""
        if len(tree) == 1 and not config.profile_verify:
            return self.step(mx.array(tree.tokens), cache, capture_layers, config)
        inputs = TreeInputs.build(tree, self.prefix_length(cache), config)
        clock = inputs.clock
        h = clock.lap("embed", self.embed(mx.array(tree.tokens)[None]))
        captures, captured, early = [], {}, EarlyStart()
        h = receive(self.stage, h)
        for index, (layer, entry) in enumerate(zip(self.layers, cache), self.first_layer):
            h, capture = self.tree_layer(layer, h, entry, inputs)
            h = early(index, h, self)
            captures.append(capture)
            if index in capture_layers:
                captured[index] = h
        h, hidden = pass_on(self.stage, h, captured, capture_layers)
        logits = clock.lap("head", self.logits(h[0]))
        return VerifyOutput(logits, hidden, captures, clock.seconds, inputs.kernels, started=early.first,
                            waited=early.waited)

    def step(self, token: mx.array, cache: list[Any], capture_layers: list[int],
             config: DDTreeConfig | None = None) -> VerifyOutput:
        """The model's one-token step, straight into the cache (`token` [1] may still be lazy); with `config`, its
        attention layers as `lone_root` says."""
        early = EarlyStart()
        h, hidden = self.forward(token, cache, capture_layers, early, self.lone_root(cache, config))
        return VerifyOutput(self.logits(h), hidden, [], committed=True, started=early.first, waited=early.waited)

    def lone_root(self, cache: list[Any], config: DDTreeConfig | None) -> TreeInputs | None:
        """A step's attention layers run as a lone root's verify, into the cache (step_attention), where that is
        faster: on the CPU from a long context (`splits`), where mlx-lm's attention spends most of its time in
        MLX's softmax exponentials (a step at 6K tokens: 126 -> 110 ms here; BENCHMARKS.md). Not with a quantized
        KV cache, whose attention is mlx-lm's own either way."""
        if config is None or not cpu_exp.on_cpu() or any(hasattr(entry, "bits") for entry in cache):
            return None
        prefix = self.prefix_length(cache)
        if not splits(config, prefix):
            return None
        return replace(TreeInputs.build(DraftTree.root_only(0), prefix, config), step=True, clock=PartClock(False))

    def prefix_length(self, cache: list[Any]) -> int:
        return next(entry.offset for entry in cache if self.is_attention_cache(entry))

    def mixer_kind(self, layer: Any) -> str:
        return "attention"

    def mixer_tree(self, layer: Any, x: mx.array, cache_entry: Any, inputs: TreeInputs) -> tuple[mx.array, Capture]:
        raise NotImplementedError


class PartClock:
    """With DDTREE_PROFILE_VERIFY, evaluate after each layer part so its time is its own (this serializes
    MLX's lazy graph, so profiled runs are slower than real ones). DDTREE_PROFILE_DETAIL also splits the token
    mixers into their steps ("linear.conv", "attention.sdpa", ...); the mixer's own entry keeps the rest."""

    def __init__(self, enabled: bool, detail: bool = False):
        self.enabled = enabled
        self.detailed = enabled and detail
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def detail(self, part: str, value: Any) -> Any:
        return self._lap(part, value) if self.detailed else value

    def lap(self, part: str, value: mx.array) -> mx.array:
        return self._lap(part, value) if self.enabled else value

    def _lap(self, part: str, value: Any) -> Any:
        mx.eval(value)
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self.last
        self.last = now
        return value


def join_rows(a: mx.array | None, b: mx.array | None) -> mx.array | None:
    """Captured hidden states of consecutive tokens, either part possibly absent."""
    return b if a is None else a if b is None else mx.concatenate([a, b])


EARLY_EVERY = 4  # layers


class EarlyStart:
    """After the first layer and every EARLY_EVERY layers after it, start computing what is built so far: the device
    runs the first layers while Python builds the rest of the graph, instead of waiting for all of it (the same
    ops, so the same values). The first hand-over comes after one layer, so the device waits for the building of
    one layer only (after four, that was most of the host time left in a small model's tree cycle).
    `first` is when the device first got work: graph building after it is hidden behind the device. `waited` is
    how long that first hand-over blocked: MLX returns from async_eval only once few enough operations are left in
    flight (on the CPU backend a few dozen), so with a big graph the caller waits there for the device."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.waited = 0.0

    def __call__(self, index: int, h: mx.array, target: TargetAdapter) -> mx.array:
        """`h` after layer `index`; never the last layer's output, which the caller may not need (a prefill
        chunk evaluates only the cache)."""
        if (index - target.first_layer) % EARLY_EVERY == 0 and index < target.first_layer + len(target.layers) - 1:
            start = time.perf_counter()
            mx.async_eval(h)
            if self.first is None:
                self.first = time.perf_counter()
                self.waited = self.first - start
        return h


def receive(stage: Stage | None, h: mx.array) -> mx.array:
    """Pipeline parallel: a stage after the first takes its input from the rank that runs the layers before."""
    if stage is None or stage.rank == stage.size - 1:
        return h
    return mx.distributed.recv_like(h, stage.rank + 1, group=stage.group)


def pass_on(stage: Stage | None, h: mx.array, captured: dict[int, mx.array], capture_layers: list[int],
            last_entry: Any = None) -> tuple[mx.array, mx.array | None]:
    """The last layer's output [1, n, hidden] and the captured layers' outputs concatenated in layer order [n, F]
    (None if none). Pipeline parallel, on every rank: a stage hands its output to the next one (rank - 1; rank 0
    runs the last layers), then one all_gather gives every rank rank 0's output and every captured layer (each
    rank sends the ones it ran, zeros for the others: their sum is exact)."""
    if stage is None:
        return h, mx.concatenate([captured[i] for i in sorted(captured)], axis=-1)[0] if captured else None
    if stage.rank != 0:
        h = mx.distributed.send(h, stage.rank - 1, group=stage.group)
        if last_entry is not None:  # writing the cache runs the send too (a prefill chunk evaluates only the cache)
            tie(last_entry, h)
    mine = [captured.get(i, mx.zeros_like(h)) for i in sorted(set(capture_layers))]
    everything = mx.distributed.all_gather(mx.concatenate([h, *mine], axis=-1), group=stage.group)
    width = h.shape[-1]
    return everything[:1, :, :width], everything[:, :, width:].sum(axis=0) if mine else None


def tie(entry: Any, h: mx.array) -> None:
    """Make evaluating a cache entry evaluate `h` too (as mlx-lm's pipelined models do)."""
    if hasattr(entry, "keys"):
        entry.keys = mx.depends(entry.keys, h)
    else:
        entry[0] = mx.depends(entry[0], h)
