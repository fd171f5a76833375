"""An OpenAI-compatible HTTP server on the standard library.

    POST /v1/chat/completions   messages -> the tokenizer's chat template
    POST /v1/completions        a plain prompt string
    GET  /v1/models, /health

Both POST endpoints stream (server-sent events) or answer with the whole object. Every generation runs on one
long-lived worker thread: MLX streams are thread-local, so model work must stay on one thread, and a single
worker is also what makes concurrent requests queue. A streaming client that disconnects cancels its
generation at the next committed step.
"""

from __future__ import annotations

import json
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import closing
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..blas import blas_name
from ..config import DDTreeConfig, is_int, is_number
from ..engine import calibration
from ..engine.generate import DecodeStep, GenerationStats, stream_generate
from ..engine.prompt_cache import PromptCache
from ..kernels.metal import kernel_path
from ..loading.load import encode_prompt
from ..models.kv_quantization import KVQuantization
from ..models.registry import adapter_for
from .sharded import lockstep, share

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 16 * 2**20  # a 262k-token conversation is ~1 MB of JSON
READ_TIMEOUT = 30.0  # seconds to send a request (and to take each streamed write)
MAX_QUEUE = 32  # requests waiting for the model beyond the one it runs; more get 503
RETRY_AFTER = 2  # seconds, in a 503's Retry-After


class BadRequest(ValueError):
    """A request the server refuses, with HTTP `status` (400 unless said); `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


# --- requests ---------------------------------------------------------------------------------------------------


@dataclass
class Request:
    kind: str  # "chat" or "completion"
    prompt: Any  # the messages for chat, the prompt string for completion
    max_tokens: int | None  # None: the client did not say (DEFAULT_MAX_TOKENS, within the context)
    stream: bool
    stop: list[str]
    sampling: dict[str, Any]  # temperature, top_p, top_k, seed: only those the client sent
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def _is_stop(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(s, str) for s in value))


# Types only: the engine checks ranges (temperature >= 0, top_p in (0, 1], ...) and its ValueError becomes a 400.
_SAMPLING = {"temperature": (is_number, "a number"), "top_p": (is_number, "a number"),
             "top_k": (is_int, "an integer"), "seed": (is_int, "an integer")}


def _field(body: Mapping[str, Any], name: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:  # OpenAI clients send null for "not set"
        return default
    if not check(value):
        raise BadRequest(f"'{name}' must be {what}, got {value!r}", name)
    return value


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise BadRequest(f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
    return messages


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    return prompt


# OpenAI fields this server cannot honour, each with the values that ask for nothing more: anything else is
# refused, not silently ignored.
_UNSUPPORTED = {
    "n": (lambda v: is_int(v) and v == 1, "one completion per request"),
    "best_of": (lambda v: is_int(v) and v == 1, "one completion per request"),
    "logprobs": (lambda v: v is False, "no log-probabilities"),
    "top_logprobs": (lambda v: is_int(v) and v == 0, "no log-probabilities"),
    "tools": (lambda v: v == [], "no tool calling"),
    "tool_choice": (lambda v: v == "none", "no tool calling"),
    "functions": (lambda v: v == [], "no function calling"),
    "function_call": (lambda v: v == "none", "no function calling"),
}


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, (harmless, what) in _UNSUPPORTED.items():
        if body.get(name) is not None and not harmless(body[name]):
            raise BadRequest(f"'{name}' is not supported: this server gives {what}; leave it out", name)


def parse_request(kind: str, body: Any) -> Request:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    _refuse_unsupported(body)
    prompt = _messages(body) if kind == "chat" else _prompt(body)
    # Newer chat clients send max_completion_tokens instead of max_tokens.
    limit = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, limit, lambda v: is_int(v) and v > 0, "a positive integer")
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    stop = _field(body, "stop", _is_stop, "a string or a list of strings", [])
    sampling = {name: value for name, (check, what) in _SAMPLING.items()
                if (value := _field(body, name, check, what)) is not None}
    stop = [stop] if isinstance(stop, str) else stop
    return Request(kind, prompt, max_tokens, stream, [s for s in stop if s], sampling)


# --- text -------------------------------------------------------------------------------------------------------


class TextStream:
    """Turns committed tokens into text that is safe to send: whole characters only, cut before the first stop
    string, and holding back a tail that could still grow into one.

    It decodes the whole token list each time and hands out the new suffix, so the text matches
    `tokenizer.decode` of all the tokens exactly (O(n^2) decoding, cheap next to a model step)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = list(stops)
        self.ids: list[int] = []  # tokens whose text counts; cut after the one that completes a stop string
        self.sent = 0  # characters of the decoded text already handed out
        self.stopped = False

    def add(self, tokens: Sequence[int]) -> str:
        start = len(self.ids)
        self.ids += tokens
        text = self.decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            self._drop_after_stop(start)
            return self._take(text, cut)
        # An incomplete multi-byte character decodes to U+FFFD until its last byte arrives.
        end = len(text.rstrip("\ufffd"))
        return self._take(text, end - self._stop_prefix(text[self.sent:end]))

    def flush(self) -> str:
        """What is held back, once no more tokens will come."""
        return self._take(self.decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.sent:end]
        self.sent += len(piece)
        return piece

    def _find_stop(self, text: str) -> int | None:
        # Held-back text keeps every stop string from starting inside what was already sent.
        return min((i for s in self.stops if (i := text.find(s, self.sent)) >= 0), default=None)

    def _stop_prefix(self, text: str) -> int:
        """The length of the longest tail of `text` that begins a stop string."""
        longest = max(map(len, self.stops), default=0)
        for n in range(min(len(text), longest), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stops):
                return n
        return 0

    def _drop_after_stop(self, start: int) -> None:
        """Count only the tokens it took to complete the stop string, not the rest of their cycle."""
        for end in range(start + 1, len(self.ids)):
            if self._find_stop(self.decode(self.ids[:end])) is not None:
                del self.ids[end:]
                return


# --- generation -------------------------------------------------------------------------------------------------


@dataclass
class Piece:
    """New text from one committed step; the last piece has a finish_reason and the usage and ddtree fields."""

    text: str
    finish_reason: str | None = None
    final: dict[str, Any] | None = None


@dataclass
class _Job:
    produce: Callable[[], Iterator[Any]]
    out: queue.Queue = field(default_factory=queue.Queue)  # (kind, value) events for the caller
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """One thread that runs jobs one at a time. A job is a function returning an iterator; its items travel to
    the caller through a queue, and a caller that stops listening cancels the job at its next item."""

    def __init__(self, max_waiting: int = MAX_QUEUE, on_stop: Callable[[], None] = lambda: None) -> None:
        self.jobs: queue.Queue = queue.Queue()
        self.max_waiting, self.on_stop = max_waiting, on_stop
        self.current: _Job | None = None
        self.thread = threading.Thread(target=self._loop, name="ddtree-model", daemon=True)
        self.thread.start()

    def stream(self, produce: Callable[[], Iterator[Any]]) -> Iterator[Any]:
        if self.jobs.qsize() >= self.max_waiting:  # waiting without bound would only time clients out later
            raise BadRequest(f"the server is busy ({self.max_waiting} requests waiting); retry shortly",
                             status=503, code="server_busy")
        job = _Job(produce)
        self.jobs.put(job)
        try:
            while True:
                kind, value = job.out.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            job.cancelled.set()

    def stop(self) -> None:
        """Cancel the running job at its next item, refuse the waiting ones, and wait for the thread to end."""
        if (job := self.current) is not None:
            job.cancelled.set()
        while True:
            try:
                waiting = self.jobs.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.out.put(("error", BadRequest("the server is stopping", status=503, code="server_stopping")))
        self.jobs.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.current = job
            if job.cancelled.is_set():
                continue
            try:
                with closing(job.produce()) as items:
                    for item in items:
                        job.out.put(("item", item))
                        if job.cancelled.is_set():
                            break
                job.out.put(("done", None))
            except Exception as error:  # handed to the request's thread, which answers 400 or 500
                job.out.put(("error", error))
        self.on_stop()  # on this thread: sharded, the other ranks are told after the last job's collectives


class Engine:
    """The model, its tokenizer and drafter, and the settings every request runs with."""

    def __init__(self, target_model: Any, tokenizer: Any, drafter: Any, *, model_name: str, method: str,
                 config: DDTreeConfig, stop_token_ids: Sequence[int] | None, kv: Mapping[str, Any] | None = None,
                 max_queue: int = MAX_QUEUE):
        self.target_model, self.tokenizer, self.drafter = target_model, tokenizer, drafter
        self.model_name, self.method, self.config, self.stop_token_ids = model_name, method, config, stop_token_ids
        self.prompt_cache = PromptCache(config.prompt_cache_bytes) if config.prompt_cache_bytes else None
        self.kv = dict(kv or {})  # kv_bits, kv_group_size, quantized_kv_start for every request
        self.target = adapter_for(target_model)  # sizes and layer kinds, built once (not per request)
        KVQuantization(*self.kv.values()).check(self.target.head_dim)  # fails at start, not per request
        if method == "ddtree" and config.tree_budget == "auto":
            calibration.verify_costs(self.target, config)  # measured (once per model and machine) before the first request
        self.group = self.target.group  # sharded: rank 0 serves, the others follow (sharded_serving.py)
        self.created = int(time.time())
        self.worker = Worker(max_queue, on_stop=self.release)

    def generate(self, request: Request) -> Iterator[Piece]:
        return self.worker.stream(lambda: self._pieces(request))

    def health(self) -> dict[str, Any]:
        """What a hybrid target's tree recurrence runs as here ("metal" once the kernels passed their self-check,
        else "twin"; "none" for other targets) and which BLAS the CPU uses."""
        target = self.target
        hybrid = any(target.mixer_kind(layer) == "linear" for layer in target.layers)
        return {"status": "ok", "kernels": kernel_path(self.config) if hybrid else "none",
                "blas": blas_name(), "prompt_cache": self.prompt_cache.stats() if self.prompt_cache else None}

    def _prompt_tokens(self, request: Request) -> list[int]:
        """The one encoder the CLI and benchmark use too (loading.encode_prompt)."""
        try:
            return encode_prompt(self.tokenizer, request.prompt, chat=request.kind == "chat")
        except ValueError as error:
            raise BadRequest(str(error), "messages" if request.kind == "chat" else "prompt") from None

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
            rendered = encode_prompt(self.tokenizer, head, add_generation_prompt=False)
            ends.add(next((i for i, (a, b) in enumerate(zip(rendered, prompt)) if a != b), min(len(rendered), len(prompt))))
        return sorted(ends)

    def _max_tokens(self, request: Request, prompt: list[int]) -> int:
        """The client's max_tokens, refused if the context cannot hold it; else the default, within the context."""
        context = self.target.context_length
        room = context - len(prompt) if context else None
        wanted = request.max_tokens or DEFAULT_MAX_TOKENS
        if room is not None and (room <= 0 or (request.max_tokens is not None and wanted > room)):
            raise BadRequest(f"the model's context is {context} tokens; the prompt has {len(prompt)} and max_tokens "
                             f"asks for {wanted}: shorten the prompt or ask for at most {max(room, 0)} tokens",
                             "max_tokens" if room > 0 else "messages" if request.kind == "chat" else "prompt",
                             code="context_length_exceeded")
        return wanted if room is None else min(wanted, room)

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

    def _steps(self, job: dict[str, Any]) -> Iterator[DecodeStep]:
        steps = stream_generate(
            target_model=self.target_model, draft_model=self.drafter, tokenizer=self.tokenizer,
            prompt_tokens=job["prompt"], max_new_tokens=job["max_new_tokens"], config=self.config,
            stop_token_ids=self.stop_token_ids, method=self.method, prompt_cache=self.prompt_cache,
            prompt_checkpoints=job["checkpoints"], **job["sampling"], **self.kv,
        )
        return steps if self.group is None else lockstep(steps, self.group)

    def _pieces(self, request: Request) -> Iterator[Piece]:
        prompt = self._prompt_tokens(request)
        job = {"prompt": prompt, "max_new_tokens": self._max_tokens(request, prompt),
               "checkpoints": self._checkpoints(request, prompt), "sampling": dict(request.sampling)}
        if self.group is not None:
            # Every rank draws the same tokens: an unseeded request gets rank 0's seed.
            if job["sampling"].get("seed") is None:
                job["sampling"]["seed"] = int.from_bytes(os.urandom(4), "little")
            share(self.group, job)
        steps = self._steps(job)
        text = TextStream(self.tokenizer.decode, request.stop)
        generated = 0
        for step in steps:
            generated += len(step.tokens)
            # A "stop" step ends with the stop token, which is not part of the text.
            piece = text.add(step.tokens[:-1] if step.finish_reason == "stop" else step.tokens)
            finish = "stop" if text.stopped else step.finish_reason
            if finish is None:
                yield Piece(piece)
                continue
            completion = len(text.ids) if text.stopped else generated
            usage = {"prompt_tokens": len(prompt), "completion_tokens": completion,
                     "total_tokens": len(prompt) + completion}
            tail = "" if text.stopped else text.flush()
            yield Piece(piece + tail, finish, {"usage": usage, "ddtree": _stats(step.stats, generated)})
            return


def _stats(stats: GenerationStats, generated: int) -> dict[str, Any]:
    summary = stats.summary(generated)
    keys = ("tokens_per_second", "cycles", "avg_acceptance", "fast_path_ratio", "prefill_seconds",
            "reused_prompt_tokens")
    return {key: summary[key] for key in keys}


# --- responses --------------------------------------------------------------------------------------------------

_OBJECTS = {"chat": ("chat.completion", "chat.completion.chunk"), "completion": ("text_completion", "text_completion")}


def _envelope(request: Request, model: str, choice: dict[str, Any], *, stream: bool, **extra: Any) -> dict:
    prefix = "chatcmpl-" if request.kind == "chat" else "cmpl-"
    return {"id": prefix + request.id, "object": _OBJECTS[request.kind][stream], "created": request.created,
            "model": model, "choices": [{"index": 0, **choice, "logprobs": None}], **extra}


def full_response(request: Request, model: str, pieces: Sequence[Piece]) -> dict[str, Any]:
    text, last = "".join(p.text for p in pieces), pieces[-1]
    body = {"message": {"role": "assistant", "content": text}} if request.kind == "chat" else {"text": text}
    return _envelope(request, model, {**body, "finish_reason": last.finish_reason}, stream=False, **last.final)


def stream_chunks(request: Request, model: str, pieces: Iterator[Piece]) -> Iterator[dict[str, Any]]:
    def chunk(text: str, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        body = {"text": text} if request.kind == "completion" else {"delta": {"content": text} if text else {}}
        return _envelope(request, model, {**body, "finish_reason": finish_reason}, stream=True, **extra)

    if request.kind == "chat":
        yield _envelope(request, model, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None},
                        stream=True)
    for piece in pieces:
        if piece.text:
            yield chunk(piece.text)
        if piece.finish_reason:
            yield chunk("", piece.finish_reason, **piece.final)


# --- HTTP -------------------------------------------------------------------------------------------------------


def _error(message: str, kind: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_ROUTES = {"/v1/models": "GET", "/health": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # a client that stops sending mid-request cannot hold a thread
        super().setup()

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        method = _ROUTES.get(path)
        if method is None:
            return self._send_json(404, _error(f"no route for {self.command} {path}", code="not_found"))
        if method != self.command:
            self.close_connection = True  # a body we will not read may follow
            return self._send_json(405, _error(f"{path} takes {method}, not {self.command}",
                                               code="method_not_allowed"), {"Allow": method})
        actions = {"/v1/models": self._models, "/health": lambda: self._send_json(200, self.server.engine.health()),
                   "/v1/chat/completions": lambda: self._complete("chat"),
                   "/v1/completions": lambda: self._complete("completion")}
        actions[path]()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _models(self) -> None:
        engine = self.server.engine
        model = {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "ddtree-mlx"}
        self._send_json(200, {"object": "list", "data": [model]})

    def _complete(self, kind: str) -> None:
        engine = self.server.engine
        try:
            request = parse_request(kind, self._read_json())
            pieces = engine.generate(request)
            first = next(pieces)  # waits for the model and prefill; the engine checks its arguments first
        except ValueError as error:
            if getattr(error, "status", 400) != 400:
                self.close_connection = True  # the body was not read to its end
            status = getattr(error, "status", 400)
            return self._send_json(status, _error(str(error), param=getattr(error, "param", None),
                                                  code=getattr(error, "code", None)),
                                   {"Retry-After": str(RETRY_AFTER)} if status == 503 else None)
        except Exception as error:
            traceback.print_exc()
            return self._send_json(500, _error(f"generation failed: {error}", kind="server_error"))
        with closing(pieces):  # closing cancels the generation if the client left early
            try:
                if request.stream:
                    self._send_events(stream_chunks(request, engine.model_name, chain([first], pieces)))
                else:
                    collected = [first]
                    for piece in pieces:
                        if self._client_gone():  # nobody will read the answer: free the model now
                            raise ConnectionAbortedError
                        collected.append(piece)
                    self._send_json(200, full_response(request, engine.model_name, collected))
            except (ConnectionError, TimeoutError):  # the client is gone or stopped reading
                self.close_connection = True

    def _client_gone(self) -> bool:
        """A closed connection reads as readable with nothing in it (a client sends nothing more after its body)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        try:
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _read_json(self) -> Any:
        try:
            return json.loads(self._read_body(), parse_constant=_no_constant)
        except ValueError as error:  # also undecodable bytes
            if isinstance(error, BadRequest):
                raise
            raise BadRequest(f"the request body is not valid JSON: {error}") from None

    def _read_body(self) -> bytes:
        """The body by Content-Length or chunked transfer, at most max_body_bytes, within the read timeout."""
        limit = self.server.max_body_bytes
        too_large = BadRequest(f"the request body is larger than {limit} bytes (serve --max-body-bytes)",
                               status=413, code="request_too_large")
        try:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return _read_chunked(self.rfile, limit, too_large)
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                raise BadRequest("Content-Length is not a number") from None
            if length < 0:
                raise BadRequest("Content-Length is negative")
            if length > limit:
                raise too_large
            body = self.rfile.read(length)
        except TimeoutError:
            raise BadRequest(f"the request body did not arrive within {self.server.read_timeout} s",
                             status=408, code="request_timeout") from None
        if len(body) < length:
            raise BadRequest(f"the body ended after {len(body)} of its {length} bytes (Content-Length)")
        return body

    def _send_json(self, status: int, payload: dict[str, Any], headers: Mapping[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, chunks: Iterator[dict[str, Any]]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for chunk in chunks:
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.write(b"data: [DONE]\n\n")


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the request body holds {name}, which is not JSON; send a finite number")


def _read_chunked(stream: Any, limit: int, too_large: BadRequest) -> bytes:
    body = bytearray()
    while True:
        line = stream.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise BadRequest("a chunk of the chunked request body has no valid size line") from None
        if size == 0:
            while stream.readline(1024).strip():  # trailer fields, up to the blank line
                pass
            return bytes(body)
        if len(body) + size > limit:
            raise too_large
        chunk = stream.read(size)
        if len(chunk) < size:
            raise BadRequest("the chunked request body ended inside a chunk")
        body += chunk
        stream.readline(1024)  # the CRLF after the chunk


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients is queued by the kernel, not reset

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that left is no error
            super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], engine: Engine | None = None, *,
                 max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT):
        self.engine, self.max_body_bytes, self.read_timeout = engine, max_body_bytes, read_timeout
        try:
            super().__init__(address, _Handler)
        except OSError as error:  # before any model loads: a busy port is a usage error
            raise ValueError(f"cannot listen on {address[0]}:{address[1]}: {error.strerror}; is another server "
                             "running there? Pick another --port") from None

    def server_close(self) -> None:
        super().server_close()
        if self.engine is not None:
            self.engine.worker.stop()


def make_server(target_model: Any, tokenizer: Any, drafter: Any, *, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "ddtree", method: str = "ddtree", config: DDTreeConfig | None = None,
                stop_token_ids: Sequence[int] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                read_timeout: float = READ_TIMEOUT, kv: Mapping[str, Any] | None = None,
                max_queue: int = MAX_QUEUE) -> ThreadingHTTPServer:
    """A bound, not yet serving server: call serve_forever(); server_address holds the port when port=0.
    `config`: the settings every request runs with (default: DDTREE_* variables, then defaults), read once here."""
    engine = Engine(target_model, tokenizer, drafter, model_name=model_name, method=method,
                    config=config if config is not None else DDTreeConfig.from_env(),
                    stop_token_ids=stop_token_ids, kv=kv, max_queue=max_queue)
    return _Server((host, port), engine, max_body_bytes=max_body_bytes, read_timeout=read_timeout)
