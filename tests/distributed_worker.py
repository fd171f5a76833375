"""Run by tests/test_distributed.py under `mlx.launch --backend ring -n 2`: tiny targets sharded with mlx-lm's
model.shard over the ranks, generating with DDTree; each rank writes what every case gave, beside mlx-lm's greedy
decoding of the same (unsharded) model, to the JSON file named on the command line + "." + its rank.
With `hang` after the file name, rank 1 stops answering mid-generation (alive, its sockets open: the ring
backend sees nothing wrong) and rank 0 is left waiting in a collective for the watchdog to end. With `serve`, rank 0 serves HTTP and asks
itself for completions (one cancelled mid-stream, one cut by a stop string, one sampled without a seed) while
rank 1 follows; rank 0 writes what came back beside mlx-lm's greedy decoding of the whole model."""

import json
import os
import random
import sys
import threading

sys.path.insert(0, os.path.dirname(__file__))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from tiny import OracleDrafter, make_dflash, make_target, make_tokenizer, mlx_lm_greedy  # noqa: E402

from ddtree_mlx import DDTreeConfig, PromptLookupDrafter, generate_ddtree_once  # noqa: E402
from ddtree_mlx.engine import calibration  # noqa: E402
from ddtree_mlx.engine.generate import stream_generate  # noqa: E402
from ddtree_mlx.loading.sharding import pipeline, shard  # noqa: E402
from ddtree_mlx.serving import generation as server_module  # noqa: E402
from ddtree_mlx.serving.generation import Engine  # noqa: E402
from ddtree_mlx.serving.http import make_server  # noqa: E402

PROMPT = [7, 7, 1, 64, 90, 33, 12, 5, 2, 88, 41]
TOKENS = 40
CASES = [("tensor", family, budget, "oracle") for family in ("qwen3_5", "llama", "qwen3") for budget in (1, 4, 16, "auto")]
CASES += [("tensor", "qwen3_5_moe", budget, "oracle") for budget in (4, "auto")]
CASES += [("pipeline", family, budget, "oracle") for family in ("qwen3_5", "llama") for budget in (1, 4, 16, "auto")]
CASES += [("pipeline", "qwen3", 4, "oracle"), ("pipeline", "qwen3_5", 4, "dflash")]  # dflash taps both stages


def layer_elements(model) -> int:
    return sum(v.size for k, v in tree_flatten(model.parameters()) if ".layers." in f".{k}")


class Counted:
    """An mx.distributed function, counted (calls and bytes): verify must communicate."""

    def __init__(self, name):
        self.name, self.calls, self.bytes, self.inner = name, 0, 0, getattr(mx.distributed, name)

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.bytes += x.nbytes
        return self.inner(x, *args, **kwargs)


def main(out: str) -> None:
    group = mx.distributed.init()
    # A sharded target measures its verify costs on every start, every rank keeping rank 0's numbers and decisions:
    # here one round of a short grid, and a short long context, so each "auto" case measures in a fraction of a
    # second.
    calibration.REPEATS, calibration.TIME_BUDGET, calibration.LONG_BUDGET, calibration.LONG_CONTEXT = 1, 0.3, 0.0, 256
    rows = []
    for sharding, family, budget, drafter in CASES:
        whole = make_target(family)
        reference = mlx_lm_greedy(whole, PROMPT, TOKENS)
        model = (shard if sharding == "tensor" else pipeline)(make_target(family), group)
        draft = OracleDrafter(PROMPT + reference.tokens) if drafter == "oracle" else make_dflash(make_target(family))
        counters = {name: Counted(name) for name in ("all_sum", "all_gather", "send")}
        for name, counter in counters.items():
            setattr(mx.distributed, name, counter)
        try:
            result = generate_ddtree_once(target_model=model, draft_model=draft, prompt_tokens=PROMPT,
                                          max_new_tokens=TOKENS, stop_token_ids=[], tree_budget=budget)
        finally:
            for name, counter in counters.items():
                setattr(mx.distributed, name, counter.inner)
        rows.append({"sharding": sharding, "family": family, "budget": budget, "drafter": drafter,
                     "tokens": result["generated_token_ids"], "reference": reference.tokens,
                     "margins": reference.margins, "cycles": result["cycles"], "tree_sizes": result["tree_sizes"],
                     "fast_path_ratio": result["fast_path_ratio"], "decode_seconds": result["decode_seconds"],
                     **{f"{name}s": c.calls for name, c in counters.items()},
                     **{f"{name}_bytes": c.bytes for name, c in counters.items()},
                     "layer_share": layer_elements(model) / layer_elements(whole)})
    finished = mx.distributed.all_gather(mx.array([len(rows)]), group=group).tolist()  # on every rank: it waits
    with open(f"{out}.{group.rank()}", "w") as file:
        json.dump({"ranks": group.size(), "finished": finished, "rows": rows}, file)


class Hanging:
    """A drafter on whose third draft rank 1 stops for good, as a stuck rank (or a lost link) would."""

    def __init__(self, inner, rank):
        self.inner, self.rank, self.calls = inner, rank, 0
        self.block_size, self.target_layer_ids = inner.block_size, inner.target_layer_ids

    def reset(self, target, prompt_tokens):
        self.inner.reset(target, prompt_tokens)

    def draft(self, *args):
        self.calls += 1
        if self.rank == 1 and self.calls == 3:
            threading.Event().wait()  # never set: stuck for good
        return self.inner.draft(*args)


def hang() -> None:
    group = mx.distributed.init()
    if group.rank() == 1:  # stuck for good, its own watchdog too (as a rank hung outside Python would be)
        os.environ["DDTREE_RANK_TIMEOUT"] = "3600"
    model = shard(make_target("llama"), group)
    reference = mlx_lm_greedy(make_target("llama"), PROMPT, TOKENS)
    generate_ddtree_once(target_model=model, draft_model=Hanging(OracleDrafter(PROMPT + reference.tokens), group.rank()),
                         prompt_tokens=PROMPT, max_new_tokens=TOKENS, stop_token_ids=[], tree_budget=4)
    print("finished, which a rank whose peer hangs must not")


CHAT = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w17 w43 w9"}]


def post(port: int, path: str, body: dict) -> dict:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    return json.loads(connection.getresponse().read())


def leave_stream(port: int, body: dict, events: int) -> None:
    """A streaming client that goes away after a few events."""
    import socket

    data = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        received = b""
        while received.count(b"data: ") < events:
            received += client.recv(4096)


class SeededOs:
    """The os module with urandom drawn from a seeded generator: the seed rank 0 draws for an unseeded request
    is then the same on every run (rank 1 must still take rank 0's, never draw its own)."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def __getattr__(self, name):
        return getattr(os, name)

    def urandom(self, size: int) -> bytes:
        return self.rng.randbytes(size)


def serve(out: str) -> None:
    group = mx.distributed.init()
    tokenizer = make_tokenizer()
    model = shard(make_target("qwen3_5"), group)
    settings = dict(method="ddtree", config=DDTreeConfig(tree_budget=4, prompt_cache_bytes=64 * 2**20),
                    stop_token_ids=None)
    if group.rank() != 0:  # follows, recording what every generation gave here
        generations = []

        def recorded(**kwargs):
            generations.append([])
            for step in stream_generate(**kwargs):
                generations[-1] += step.tokens
                yield step

        server_module.stream_generate = recorded
        Engine(model, tokenizer, PromptLookupDrafter(), model_name="ddtree", **settings).follow()
        with open(f"{out}.1", "w") as file:
            json.dump({"generations": generations}, file)
        return
    server_module.os = SeededOs(0)
    server = make_server(model, tokenizer, PromptLookupDrafter(), **settings)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port, rows = server.server_address[1], []

    def chat(messages, **body):
        reply = post(port, "/v1/chat/completions", {"messages": messages, **body})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        rows.append({"got": reply["choices"][0]["message"]["content"], "finish": reply["choices"][0]["finish_reason"],
                     "reused": reply["ddtree"]["reused_prompt_tokens"], "prompt": prompt, **body})
        return rows[-1]["got"]

    first = chat(CHAT, max_tokens=16)
    leave_stream(port, {"prompt": "w3 w4 w5 w6", "max_tokens": 40}, events=3)
    second = CHAT + [{"role": "assistant", "content": first}, {"role": "user", "content": "w20 w21"}]
    chat(second, max_tokens=16)  # a second turn: the prompt cache hits on every rank
    chat(CHAT, max_tokens=16, stop=[first.split()[4]])  # cut by a stop string: rank 0 stops the others
    chat(CHAT, max_tokens=12, temperature=1.0)  # unseeded: every rank draws with rank 0's seed
    chat(CHAT, max_tokens=16)
    server.shutdown()
    server.server_close()  # rank 1 is told, and returns
    whole = make_target("qwen3_5")
    for row in rows:
        reference = mlx_lm_greedy(whole, row["prompt"], row["max_tokens"])
        row.update(reference=reference.tokens, margins=reference.margins)
    with open(f"{out}.0", "w") as file:
        json.dump({"rows": rows}, file)


if __name__ == "__main__":
    modes = {"hang": hang, "serve": lambda: serve(sys.argv[1])}
    modes.get(sys.argv[2] if len(sys.argv) > 2 else "", lambda: main(sys.argv[1]))()
