"""The server on a target sharded across processes (`mlx.launch ... ddtree-mlx serve --sharding tensor`).

Rank 0 owns HTTP: it reads, queues and refuses requests and decides everything about them. Every rank must still
run every generation's collectives in the same order, so for each request rank 0 sends the others what they need
to run the same generation (`share`: the prompt's tokens, the length, sampling with a seed it drew, the
prompt-cache checkpoints), and after each step whether it goes on (`lockstep`: a client left, a stop string
matched). The prompt cache's decisions need no message: every rank sees the same requests in the same order, so
every rank's cache stores, hits and evicts alike.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

import mlx.core as mx
import numpy as np

from ..engine.generate import DecodeStep
from ..engine.ranks import broadcast


def share(group: Any, job: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Rank 0's `job` on every rank (None: the server stops); the other ranks pass nothing and wait for it."""
    data = np.frombuffer(json.dumps(job).encode(), np.uint8) if group.rank() == 0 else np.zeros(0, np.uint8)
    size = int(broadcast([len(data)], group)[0])
    mine = data.astype(np.int32) if group.rank() == 0 else np.zeros(size, np.int32)
    return json.loads(np.array(mx.distributed.all_sum(mx.array(mine), group=group)).astype(np.uint8).tobytes())


def lockstep(steps: Iterator[DecodeStep], group: Any) -> Iterator[DecodeStep]:
    """The steps of one generation, ending on every rank where rank 0's caller stops taking them: after each step
    but the last, rank 0 says whether it goes on (also when its caller closes this early) and the others follow."""
    for step in steps:
        going = 0.0
        try:
            yield step
            going = 1.0
        finally:
            last = step.finish_reason is not None
            if not last:
                going = broadcast([going], group)[0]
        if last or not going:
            break
