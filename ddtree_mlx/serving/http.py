"""An OpenAI-compatible HTTP server on the standard library.

    POST /v1/chat/completions   messages (and tools) -> the tokenizer's chat template
    POST /v1/completions        a plain prompt string
    POST /v1/messages           Anthropic's Messages API (anthropic.py); /v1/messages/count_tokens
    GET  /v1/models, /health

The generating endpoints stream (server-sent events) or answer with the whole object. Every generation runs on
the engine's one model thread (worker.py): concurrent requests are decoded together, up to max_batch, and the
rest queue. A client that disconnects cancels its generation at the next committed step. With an API key set,
every route but /health needs it (`Authorization: Bearer KEY` or `x-api-key: KEY`); errors come in the shape of
the route's API.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import sys
from contextlib import closing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import chain
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..config import DDTreeConfig
from . import anthropic
from .generation import DEFAULT_MAX_TOKENS, Engine
from .output import Output
from .responses import error_body, full_response, stream_chunks
from .schema import BadRequest, parse_request
from .worker import MAX_QUEUE

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20  # a 262k-token conversation is ~1 MB of JSON
READ_TIMEOUT = 30.0  # seconds to send a request (and to take each streamed write)
RETRY_AFTER = 2  # seconds, in a 503's Retry-After

_ROUTES = {"/v1/models": "GET", "/health": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST",
           "/v1/messages": "POST", "/v1/messages/count_tokens": "POST"}


class _Handler(BaseHTTPRequestHandler):
    server: "Server"
    anthropic = False  # whether the route is Anthropic's (its error shape)

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # a client that stops sending mid-request cannot hold a thread
        super().setup()

    def log_message(self, fmt: str, *args: Any) -> None:  # each request and refusal, as a log record
        log.info("%s %s", self.address_string(), fmt % args)

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")  # ?beta=true (the Anthropic SDK's beta calls) is ignored
        self.anthropic = path.startswith("/v1/messages")
        if path != "/health" and not self._authorized():
            self.close_connection = True  # a body we will not read may follow
            return self._error(401, "a valid API key is required: send Authorization: Bearer KEY or x-api-key",
                               code="invalid_api_key")
        method = _ROUTES.get(path)
        if method is None:
            self.close_connection = True  # a body we will not read may follow
            return self._error(404, f"no route for {self.command} {path}", code="not_found")
        if method != self.command:
            self.close_connection = True  # a body we will not read may follow
            return self._error(405, f"{path} takes {method}, not {self.command}", code="method_not_allowed",
                               headers={"Allow": method})
        actions = {"/v1/models": self._models, "/health": lambda: self._send_json(200, self.server.engine.health()),
                   "/v1/chat/completions": lambda: self._complete("chat"),
                   "/v1/completions": lambda: self._complete("completion"),
                   "/v1/messages": lambda: self._complete("messages"), "/v1/messages/count_tokens": self._count}
        actions[path]()

    def _authorized(self) -> bool:
        """The server's API key, if it has one, in either header; compared in constant time."""
        key = self.server.api_key
        if not key:
            return True
        bearer = self.headers.get("Authorization", "")
        given = [self.headers.get("x-api-key", ""), bearer[7:].strip() if bearer[:7].lower() == "bearer " else ""]
        return any(hmac.compare_digest(g.encode(), key.encode()) for g in given if g)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        """An error in the route's API's shape (Anthropic's busy is 529)."""
        if self.anthropic:
            status = 529 if status == 503 else status
            return self._send_json(status, anthropic.error_body(status, message), headers)
        kind = "authentication_error" if status == 401 else kind
        self._send_json(status, error_body(message, kind=kind, param=param, code=code), headers)

    def _count(self) -> None:
        """count_tokens: the prompt rendered as /v1/messages would, without waiting for the model thread."""
        try:
            request = anthropic.parse_request(self._read_json(), counting=True)
            self._send_json(200, {"input_tokens": len(self.server.engine.render(request).tokens)})
        except ValueError as error:
            self._refuse(error)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _dispatch

    def _models(self) -> None:
        engine = self.server.engine
        model = {"id": engine.model_name, "object": "model", "created": engine.created, "owned_by": "ddtree-mlx"}
        self._send_json(200, {"object": "list", "data": [model]})

    def _complete(self, kind: str) -> None:
        """kind "chat", "completion" (OpenAI) or "messages" (Anthropic)."""
        engine, model = self.server.engine, self.server.engine.model_name
        try:
            if kind == "messages":
                request = anthropic.parse_request(self._read_json())
                anthropic.fit(request, engine)
            else:
                request = parse_request(kind, self._read_json())
            pieces = engine.generate(request)  # renders the prompt: a refusal comes before the request queues
            first = next(pieces)  # waits for the model and prefill; the engine checks its arguments first
        except Exception as error:
            return self._failed(error)
        output = Output(engine.tokenizer, request, request.rendered) if request.kind == "chat" else None
        with closing(pieces):  # closing cancels the generation if the client left early
            try:
                if request.stream and kind == "messages":
                    events = anthropic.stream_events(request, model, chain([first], pieces), output)
                    self._send_events((f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events))
                elif request.stream:
                    chunks = stream_chunks(request, model, chain([first], pieces), output)
                    self._send_events(chain((f"data: {json.dumps(chunk)}\n\n" for chunk in chunks),
                                            ["data: [DONE]\n\n"]))
                else:
                    shape = anthropic.full_message if kind == "messages" else full_response
                    self._send_json(200, shape(request, model, self._collect(first, pieces), output))
            except (ConnectionError, TimeoutError):  # the client is gone or stopped reading
                self.close_connection = True
            except Exception as error:  # a whole answer failed midway: nothing was sent yet (streams end in-band)
                self._failed(error)

    def _failed(self, error: Exception) -> None:
        if isinstance(error, ValueError):  # a BadRequest, or the engine refusing an argument
            return self._refuse(error)
        log.exception("generation failed")
        self._error(500, f"generation failed: {error}", kind="server_error")

    def _refuse(self, error: ValueError) -> None:
        status = getattr(error, "status", 400)
        if status != 400:
            self.close_connection = True  # the body was not read to its end
        self._error(status, str(error), param=getattr(error, "param", None), code=getattr(error, "code", None),
                    headers={"Retry-After": str(RETRY_AFTER)} if status == 503 else None)

    def _collect(self, first: Any, pieces: Iterator[Any]) -> list[Any]:
        collected = [first]
        for piece in pieces:
            if self._client_gone():  # nobody will read the answer: free the model now
                raise ConnectionAbortedError
            collected.append(piece)
        return collected

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
            length = _content_length(self.headers.get("Content-Length"))
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

    def _send_events(self, events: Iterable[str]) -> None:
        """Server-sent events; a failure once the stream began is its last event (the status was sent)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        try:
            for event in events:
                self.wfile.write(event.encode())
        except (ConnectionError, TimeoutError):
            raise
        except Exception as error:
            log.exception("generation failed while streaming")
            message = f"generation failed: {error}"
            if self.anthropic:
                self.wfile.write(f"event: error\ndata: {json.dumps(anthropic.error_body(500, message))}\n\n".encode())
            else:
                self.wfile.write(f"data: {json.dumps(error_body(message, kind='server_error'))}\n\n".encode())
            self.close_connection = True


def _no_constant(name: str) -> Any:
    raise BadRequest(f"the request body holds {name}, which is not JSON; send a finite number")


def _content_length(header: str | None) -> int:
    try:
        length = int(header or 0)
    except ValueError:
        raise BadRequest("Content-Length is not a number") from None
    if length < 0:
        raise BadRequest("Content-Length is negative")
    return length


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


class Server(ThreadingHTTPServer):
    """Bound at construction, so a busy port fails before any model loads; its `engine` may be set afterwards."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients is queued by the kernel, not reset

    def __init__(self, address: tuple[str, int], engine: Engine | None = None, *,
                 max_body_bytes: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT, api_key: str = ""):
        self.engine, self.max_body_bytes, self.read_timeout = engine, max_body_bytes, read_timeout
        self.api_key = api_key  # "" : no key needed
        try:
            super().__init__(address, _Handler)
        except OSError as error:  # before any model loads: a busy port is a usage error
            raise ValueError(f"cannot listen on {address[0]}:{address[1]}: {error.strerror}; is another server "
                             "running there? Pick another --port") from None

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that left is no error
            log.exception("error while handling a request from %s", client_address[0])

    def server_close(self) -> None:
        super().server_close()
        if self.engine is not None:
            self.engine.worker.stop()


def make_server(target_model: Any, tokenizer: Any, drafter: Any, *, host: str = "127.0.0.1", port: int = 0,
                model_name: str = "ddtree", method: str = "ddtree", config: DDTreeConfig | None = None,
                stop_token_ids: Sequence[int] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                read_timeout: float = READ_TIMEOUT, kv: Mapping[str, Any] | None = None,
                max_queue: int = MAX_QUEUE, max_tokens: int = DEFAULT_MAX_TOKENS,
                sampling: Mapping[str, Any] | None = None) -> Server:
    """A bound, not yet serving server: call serve_forever(); server_address holds the port when port=0.
    `config`: the settings every request runs with (default: DDTREE_* variables, then defaults), read once here;
    its api_key, when set, guards every route but /health.
    `max_tokens`, `sampling` (temperature, top_p, top_k): defaults for requests that leave them out."""
    config = config if config is not None else DDTreeConfig.from_env()
    engine = Engine(target_model, tokenizer, drafter, model_name=model_name, method=method, config=config,
                    stop_token_ids=stop_token_ids, kv=kv, max_queue=max_queue, max_tokens=max_tokens,
                    sampling=sampling)
    return Server((host, port), engine, max_body_bytes=max_body_bytes, read_timeout=read_timeout,
                  api_key=config.api_key)
