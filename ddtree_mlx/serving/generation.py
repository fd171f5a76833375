"""The engine behind the server: a request in, `Piece`s of text out, on the one model thread: with max_batch 1
each generation runs alone (`stream_generate`), else requests are decoded together (a BatchGenerator, worker.py).
Sharded across processes, rank 0's engine tells the others what to run (sharded.py), one request at a time."""

from __future__ import annotations

import os
import time
from contextlib import closing
from functools import partial
from typing import Any, Iterator, Mapping, Sequence

from ..blas import blas_name
from ..config import DDTreeConfig
from ..engine import calibration
from ..engine.batch import BatchGenerator
from ..engine.generate import DecodeStep, stream_generate
from ..engine.prompt_cache import PromptCache
from ..engine.sampling import SamplingParams
from ..kernels import dispatch
from ..models.kv_quantization import KVQuantization
from ..models.registry import adapter_for
from .conversation import Rendered, prepare, render
from .pieces import Piece, Pieces
from .schema import BadRequest, Request
from .sharded import lockstep, share
from .worker import MAX_QUEUE, BatchWorker, Worker

DEFAULT_MAX_TOKENS = 256


class Engine:
    """The model, its tokenizer and drafter, and the settings every request runs with. `max_tokens` and `sampling`
    (temperature, top_p, top_k) are the server's defaults for a request that leaves them out."""

    def __init__(self, target_model: Any, tokenizer: Any, drafter: Any, *, model_name: str, method: str,
                 config: DDTreeConfig, stop_token_ids: Sequence[int] | None, kv: Mapping[str, Any] | None = None,
                 max_queue: int = MAX_QUEUE, max_tokens: int = DEFAULT_MAX_TOKENS,
                 sampling: Mapping[str, Any] | None = None):
        self.target_model, self.tokenizer, self.drafter = target_model, tokenizer, drafter
        self.model_name, self.method, self.config, self.stop_token_ids = model_name, method, config, stop_token_ids
        self.max_tokens, self.sampling = max_tokens, dict(sampling or {})
        SamplingParams(**self.sampling)  # a bad default fails at start, not in every request
        self.prompt_cache = PromptCache(config.prompt_cache_bytes) if config.prompt_cache_bytes else None
        self.kv = dict(kv or {})  # kv_bits, kv_group_size, quantized_kv_start for every request
        self.target = adapter_for(target_model)  # sizes and layer kinds, built once (not per request)
        KVQuantization(*self.kv.values()).check(self.target.head_dim)  # fails at start, not per request
        dispatch.prepare(self.target.kernel_shapes(), config)
        if method == "ddtree" and config.tree_budget == "auto":
            calibration.verify_costs(self.target, config)  # measured once per model and machine, before any request
        self.group = self.target.group  # sharded: rank 0 serves, the others follow (sharded.py)
        self.created = int(time.time())
        # Sharded, every rank runs rank 0's generations in lockstep, one at a time (sharded.py): never batched.
        self.batched = config.max_batch > 1 and self.group is None
        if self.batched:
            batch = BatchGenerator(target_model, drafter, tokenizer=tokenizer, method=method, config=config,
                                   prompt_cache=self.prompt_cache, **self.kv)
            self.worker: Worker = BatchWorker(batch, max_queue)
        else:
            self.worker = Worker(max_queue, on_stop=self.release)

    def generate(self, request: Request) -> Iterator[Piece]:
        self.render(request)  # here, on the caller's thread: a refused prompt never queues
        return self.worker.stream(partial(self._join if self.batched else self._pieces, request))

    def render(self, request: Request) -> Rendered:
        """The request's prompt with its tools (conversation.py), rendered once; needs no model work."""
        if request.rendered is None:
            prepare(request)
            request.rendered = render(self.tokenizer, request)
        return request.rendered

    def health(self) -> dict[str, Any]:
        """What a hybrid target's tree recurrence runs as here ("metal" once the kernels passed their self-check,
        else "twin"; "none" for other targets), which BLAS the CPU uses, the prompt cache's use, and the batch:
        rows decoding, requests waiting, max_batch and the largest batch one forward verified."""
        target = self.target
        hybrid = any(target.mixer_kind(layer) == "linear" for layer in target.layers)
        return {"status": "ok", "kernels": dispatch.kernel_path(self.config) if hybrid else "none",
                "blas": blas_name(), "prompt_cache": self.prompt_cache.stats() if self.prompt_cache else None,
                "batch": self.worker.health()}

    def release(self) -> None:
        """Sharded: the server stopped; the other ranks, waiting for its next job, may stop too."""
        if self.group is not None:
            share(self.group, None)

    def follow(self) -> None:
        """Sharded, on every rank but 0: run each generation rank 0 runs, until its server stops."""
        while (job := share(self.group)) is not None:
            try:
                for _ in self._steps(job):
                    pass
            except ValueError:  # refused before any model work, as on rank 0
                continue

    def _prompt_tokens(self, request: Request) -> list[int]:
        return self.render(request).tokens

    def _checkpoints(self, request: Request, prompt: list[int]) -> list[int]:
        """Where a chat's system message and its earlier turns end in the prompt: later requests that share only
        that much (another user turn on the same system prompt) still hit the prompt cache on hybrid targets."""
        if request.kind != "chat" or self.prompt_cache is None:
            return []
        messages = request.prompt
        heads = [messages[:1]] if messages[0]["role"] == "system" and len(messages) > 1 else []
        heads += [messages[:-1]] if len(messages) > 2 else []
        ends = set()
        for head in heads:
            try:
                rendered = render(self.tokenizer, request, head).tokens
            except BadRequest:  # a template may refuse a conversation's head alone: no checkpoint there
                continue
            shared = min(len(rendered), len(prompt))
            ends.add(next((i for i, (a, b) in enumerate(zip(rendered, prompt)) if a != b), shared))
        return sorted(ends)

    def _max_tokens(self, request: Request, prompt: list[int]) -> int:
        """The client's max_tokens, refused if the context cannot hold it; else the default, within the context."""
        context = self.target.context_length
        room = context - len(prompt) if context else None
        wanted = request.max_tokens or self.max_tokens
        if room is not None and (room <= 0 or (request.max_tokens is not None and wanted > room)):
            raise BadRequest(f"the model's context is {context} tokens; the prompt has {len(prompt)} and max_tokens "
                             f"asks for {wanted}: shorten the prompt or ask for at most {max(room, 0)} tokens",
                             "max_tokens" if room > 0 else "messages" if request.kind == "chat" else "prompt",
                             code="context_length_exceeded")
        return wanted if room is None else min(wanted, room)

    def _job(self, request: Request) -> dict[str, Any]:
        """What every rank needs to run the request's generation (sharded, rank 0 sends it to the others)."""
        prompt = self._prompt_tokens(request)
        job = {"prompt": prompt, "max_new_tokens": self._max_tokens(request, prompt),
               "checkpoints": self._checkpoints(request, prompt), "sampling": {**self.sampling, **request.sampling}}
        job["logprobs"] = request.logprobs
        if self.group is not None:
            # Every rank draws the same tokens: an unseeded request gets rank 0's seed.
            if job["sampling"].get("seed") is None:
                job["sampling"]["seed"] = int.from_bytes(os.urandom(4), "little")
            share(self.group, job)
        return job

    def _steps(self, job: dict[str, Any]) -> Iterator[DecodeStep]:
        steps = stream_generate(
            target_model=self.target_model, draft_model=self.drafter, tokenizer=self.tokenizer,
            prompt_tokens=job["prompt"], max_new_tokens=job["max_new_tokens"], config=self.config,
            stop_token_ids=self.stop_token_ids, method=self.method, prompt_cache=self.prompt_cache,
            prompt_checkpoints=job["checkpoints"], **job["sampling"], **self.kv, logprobs=job.get("logprobs"),
        )
        return steps if self.group is None else lockstep(steps, self.group)

    def _pieces(self, request: Request) -> Iterator[Piece]:
        job = self._job(request)
        pieces = Pieces(self.tokenizer, request, len(job["prompt"]))
        # Closing the steps early (a stop string matched) ends the generation, on every rank when sharded.
        with closing(self._steps(job)) as steps:
            for step in steps:
                yield pieces.push(step)
                if pieces.done:
                    return

    def _join(self, request: Request, batch: BatchGenerator) -> tuple[int, Pieces]:
        """The request inserted into the batch (on the model thread, between its steps), and what its responses
        go through; a bad request raises here, before any model work."""
        job = self._job(request)
        uid = batch.insert(job["prompt"], max_new_tokens=job["max_new_tokens"], stop_token_ids=self.stop_token_ids,
                           prompt_checkpoints=job["checkpoints"], logprobs=job["logprobs"], **job["sampling"])
        return uid, Pieces(self.tokenizer, request, len(job["prompt"]))
