"""Run by tests/test_distributed.py under `mlx.launch --backend ring -n 2`: tiny targets sharded with mlx-lm's
model.shard over the ranks, generating with DDTree; each rank writes what every case gave, beside mlx-lm's greedy
decoding of the same (unsharded) model, to the JSON file named on the command line + "." + its rank."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from ddtree_mlx import generate_ddtree_once  # noqa: E402
from ddtree_mlx.distributed import shard  # noqa: E402
from tiny import OracleDrafter, make_target, mlx_lm_greedy  # noqa: E402

PROMPT = [7, 7, 1, 64, 90, 33, 12, 5, 2, 88, 41]
TOKENS = 40
CASES = [(family, budget) for family in ("qwen3_5", "llama", "qwen3") for budget in (1, 4, 16, "auto")]
CASES += [("qwen3_5_moe", budget) for budget in (4, "auto")]


def layer_elements(model) -> int:
    return sum(v.size for k, v in tree_flatten(model.parameters()) if ".layers." in f".{k}")


class Counted:
    """mx.distributed.all_sum, counted (calls and bytes reduced): verify must communicate."""

    def __init__(self):
        self.calls, self.bytes, self.inner = 0, 0, mx.distributed.all_sum

    def __call__(self, x, *args, **kwargs):
        self.calls += 1
        self.bytes += x.nbytes
        return self.inner(x, *args, **kwargs)


def main(out: str) -> None:
    group = mx.distributed.init()
    rows = []
    for family, budget in CASES:
        whole = make_target(family)
        reference = mlx_lm_greedy(whole, PROMPT, TOKENS)
        model = shard(make_target(family), group)
        counter = Counted()
        mx.distributed.all_sum = counter
        try:
            result = generate_ddtree_once(target_model=model, draft_model=OracleDrafter(PROMPT + reference.tokens),
                                          prompt_tokens=PROMPT, max_new_tokens=TOKENS, stop_token_ids=[],
                                          tree_budget=budget)
        finally:
            mx.distributed.all_sum = counter.inner
        rows.append({"family": family, "budget": budget, "tokens": result["generated_token_ids"],
                     "reference": reference.tokens, "margins": reference.margins, "cycles": result["cycles"],
                     "tree_sizes": result["tree_sizes"], "fast_path_ratio": result["fast_path_ratio"],
                     "all_sums": counter.calls, "all_sum_bytes": counter.bytes,
                     "decode_seconds": result["decode_seconds"], "layer_share": layer_elements(model) / layer_elements(whole)})
    finished = mx.distributed.all_gather(mx.array([len(rows)]), group=group).tolist()  # on every rank: it waits
    with open(f"{out}.{group.rank()}", "w") as file:
        json.dump({"ranks": group.size(), "finished": finished, "rows": rows}, file)


if __name__ == "__main__":
    main(sys.argv[1])
