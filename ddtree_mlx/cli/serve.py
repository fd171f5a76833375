"""`ddtree-mlx serve`: the OpenAI- and Anthropic-compatible HTTP server on the loaded model."""

from __future__ import annotations

import argparse
import logging

import mlx.core as mx

from ..config import parse_bytes
from ..engine.ranks import silence_other_ranks
from ..engine.sampling import SamplingParams
from ..loading.load import load, stop_token_ids
from ..serving.generation import DEFAULT_MAX_TOKENS, Engine
from ..serving.http import MAX_BODY_BYTES, READ_TIMEOUT, Server
from ..serving.worker import MAX_QUEUE
from .arguments import add_engine_arguments, deprecated, engine_config, kv_options, positive_int

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def cache_size(text: str) -> int:
    try:
        return parse_bytes("--prompt-cache-bytes", text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer or x-api-key) on every route but "
                                          "/health (default: DDTREE_API_KEY, else none; the variable keeps it out "
                                          "of the process list)")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body accepted, else HTTP 413 (default {MAX_BODY_BYTES})")
    parser.add_argument("--prompt-cache-bytes", type=cache_size,
                        help="prompt cache bound in bytes (K, M, G suffixes), 0 off "
                             "(default: DDTREE_PROMPT_CACHE_BYTES or 2G)")
    deprecated(parser, "--prompt-cache-mb", "--prompt-cache-bytes", type=lambda text: cache_size(text + "M"))
    parser.add_argument("--max-batch", type=positive_int,
                        help="requests decoded together, their trees verified in one forward; 1: one at a time; "
                             "sharded serving is always 1 (default: DDTREE_MAX_BATCH or 4)")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                        help=f"requests that may wait for the model; more get 503 + Retry-After (default {MAX_QUEUE})")
    parser.add_argument("--read-timeout", type=float, default=READ_TIMEOUT,
                        help=f"seconds a client may take to send its request, else HTTP 408 (default {READ_TIMEOUT})")
    # A request's own temperature, top_p, top_k or max_tokens wins over these (mlx-lm's server options).
    parser.add_argument("--temp", type=float, default=0.0,
                        help="default sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="default nucleus sampling mass (default: 1, off)")
    parser.add_argument("--top-k", type=int, default=0, help="default top-k sampling (default: 0, off)")
    parser.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                        help=f"default tokens to generate, within the context (default: {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="INFO",
                        help="the server's log level; INFO logs every request (default: INFO)")


def run_server(args: argparse.Namespace) -> None:
    """Serve on rank 0; sharded (under mlx.launch), the other ranks follow its requests and serve nothing."""
    if args.max_body_bytes < 1 or not args.read_timeout > 0 or args.max_queue < 0:
        raise ValueError("--max-body-bytes and --read-timeout must be positive, --max-queue >= 0")
    if args.sharding and (args.max_batch or 1) > 1:
        raise ValueError("--max-batch: a sharded target serves one request at a time; leave it out or use 1")
    logging.getLogger("ddtree_mlx").setLevel(args.log_level)
    config = engine_config(args)
    if args.api_key is not None:  # the option wins over DDTREE_API_KEY
        config = config.replace(api_key=args.api_key)
    sampling = dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k)
    SamplingParams(**sampling)  # checked before the model loads, so a typo fails at once
    rank = mx.distributed.init().rank() if args.sharding else 0
    server = None
    if rank == 0:
        server = Server((args.host, args.port), max_body_bytes=args.max_body_bytes, read_timeout=args.read_timeout,
                        api_key=config.api_key)
    target_model, tokenizer, drafter = load(args.model, args.draft_model, config=config,
                                            sharding=args.sharding)  # the port is ours first
    # stop_token_ids reads generation_config.json when --model is a local directory.
    engine = Engine(target_model, tokenizer, drafter, model_name=args.model or "ddtree", method=args.method,
                    config=config, stop_token_ids=stop_token_ids(tokenizer, args.model), kv=kv_options(args),
                    max_queue=args.max_queue, max_tokens=args.max_tokens, sampling=sampling)
    if server is None:
        silence_other_ranks()
        engine.follow()
        return
    server.engine = engine
    host, port = server.server_address[:2]
    print(f"ddtree-mlx serving {args.model or 'the embedded model'} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
