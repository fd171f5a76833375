"""What every target family shares: the plain forward with hidden-state capture, prefill, the tree verify loop
and the one-token step.

A family file supplies only how one layer's token mixer (attention or recurrence) runs over a tree. Each mixer
returns a capture that knows how to commit the accepted path into its own cache entry, so neither this file nor
the generation loop knows which family or layer type it runs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Generator, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from ..config import DDTreeConfig
from ..tree.draft_tree import DraftTree
from . import cpu_exp
from .attention import check_rope, splits
from .batch_cache import RowKV
from .sharding import gather_last_axis, pass_on, pipeline_stage, receive, sharding_group
from .verify import Capture, EarlyStart, Forest, PartClock, TreeInputs, VerifyOutput, join_rows


def to_end(steps: Generator[Any, None, Any]) -> Any:
    """Run a generator to its end: its return value (a prefill's, without pausing between chunks)."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


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
        return isinstance(entry, RowKV) or (hasattr(entry, "offset") and hasattr(entry, "keys"))

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
        return self.tree_layer(layer, h, [entry], Forest([lone]))[0]  # its keys and values are in the cache already

    def tree_layer(self, layer: Any, h: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        """One layer over the forest's nodes: the token mixer as the family runs it over each row's tree (against
        that row's cache entry), then the layer's MLP over all of them."""
        mixed, captures = self.mixer_tree(layer, layer.input_layernorm(h), entries, forest)
        h = forest.clock.lap(self.mixer_kind(layer), h + mixed)
        return forest.clock.lap("mlp", h + layer.mlp(layer.post_attention_layernorm(h))), captures

    def prefill(self, *args: Any, **kwargs: Any) -> tuple[mx.array, mx.array | None]:
        """`prefill_chunks` without pauses: the last token's logits and every prompt token's captured states."""
        return to_end(self.prefill_chunks(*args, **kwargs))

    def prefill_chunks(self, tokens: list[int], cache: list[Any], capture_layers: list[int], chunk: int,
                       after_chunk: Callable[[list[Any]], None] | None = None, snapshots: Sequence[int] = (),
                       snapshot: Callable[[int, mx.array | None], None] | None = None
                       ) -> Generator[int, None, tuple[mx.array, mx.array | None]]:
        """mlx-lm's prefill: all but the last token in chunks of `chunk`, evaluated chunk by chunk with no LM
        head; then the last token alone, whose logits [1, V] are the only ones computed. The rounding is then
        the same as mlx-lm's own (same chunks, same one-token step), and memory is bounded by a chunk.
        Returns those logits and the captured hidden states of every prompt token [n, F] (None if none).
        `after_chunk` sees the cache after every model call (mlx-lm quantizes its KV cache there); `snapshot(n,
        hidden)` is called once the first n tokens are in, for each n in `snapshots` below the last token (a chunk
        ends there too), with their captured states. It pauses between chunks, yielding the tokens each ran: a
        batch runs other rows' cycles in between, so a long prompt holds them up for one chunk at most."""
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
            if end in marks and snapshot is not None:
                snapshot(end, None if hidden is None else mx.concatenate(captured))
            if end < body:  # the tokens this chunk ran; the last chunk runs on into the last token, unpaused
                yield end - start
            start = end
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
        return self.verify_forest([tree], [cache], capture_layers, config)[0]

    def verify_forest(self, trees: list[DraftTree], caches: list[list[Any]], capture_layers: list[int],
                      config: DDTreeConfig, tokens: mx.array | None = None) -> list[VerifyOutput]:
        """One forward over several rows' trees, each after its own cache (continuous batching): the tokens of
        all trees packed along one axis through the shared weights, each row's attention and recurrence against its
        own cache, prefix length and RoPE positions. A VerifyOutput per row, as `verify` gives for that tree alone
        (lone roots included: they are verified as trees, and their captures commit them). `tokens`: the packed
        token ids, where they are still on the device (a batch's queued plain step), instead of the trees'."""
        if len(trees) > 1 and self.group is not None:
            raise ValueError("a sharded target verifies one generation at a time; serve it with --max-batch 1")
        clock = PartClock(config.profile_verify, config.profile_detail)  # one for all rows: a profile adds up
        # A batch's lone roots (always accepted) run as plain steps, straight into their caches: not where the
        # commit re-runs the target (exact_commit: written twice), nor when profiling.
        steps = len(trees) > 1 and not config.exact_commit and not config.profile_verify
        forest = Forest([replace(TreeInputs.build(tree, self.prefix_length(cache), config), clock=clock,
                                 step=steps and len(tree) == 1)
                         for tree, cache in zip(trees, caches)])
        tokens = mx.array([token for tree in trees for token in tree.tokens]) if tokens is None else tokens
        h = clock.lap("embed", self.embed(tokens[None]))
        captures, captured, early = [], {}, EarlyStart()
        h = receive(self.stage, h)
        for index, (layer, *entries) in enumerate(zip(self.layers, *caches), self.first_layer):
            h, layer_captures = self.tree_layer(layer, h, entries, forest)
            h = early(index, h, self)
            captures.append(layer_captures)
            if index in capture_layers:
                captured[index] = h
        h, hidden = pass_on(self.stage, h, captured, capture_layers)
        logits = clock.lap("head", self.logits(h[0]))
        kernels = set().union(*(inputs.kernels for inputs in forest.rows))
        hiddens = [None] * len(trees) if hidden is None else forest.split(hidden, 0)
        rows = zip(forest.split(logits, 0), hiddens, zip(*captures))
        return [VerifyOutput(row_logits, row_hidden, list(row_captures), clock.seconds, kernels, started=early.first,
                             waited=early.waited) for row_logits, row_hidden, row_captures in rows]

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

    def kernel_shapes(self) -> tuple:
        """The Metal kernels' shapes this target uses (kernels.check.Shape): none but for hybrid targets."""
        return ()

    def mixer_tree(self, layer: Any, x: mx.array, entries: list[Any], forest: Forest) -> tuple[mx.array, list[Capture]]:
        """The layer's token mixer over the forest's packed nodes x [1, T, hidden]: its output and a capture per
        row, each row against its own cache entry."""
        raise NotImplementedError
