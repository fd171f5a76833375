"""How big the trees of a batch are (DDTREE_TREE_BUDGET=auto with several rows): one choice for all of them, priced
on the forest's total rows.

A batch verifies every row's tree in one forward, so what a node costs is what one more row of that forward costs:
the measured verify curve c(n, L) (calibration.VerifyCosts) at n = all rows' nodes, roots included. Each row's
tree is built best first to the cap on its own calibrated candidates (TreeSizer.follow, which also keeps learning
what its drafts are worth), so its nodes' path probabilities p fall as they are popped. Taking the N most probable
nodes over all rows gives each row a prefix of its own tree, and the batch commits on average

    E(N) = rows + p_(1) + ... + p_(N)

tokens. What the N nodes add to the cycle is the curve's rise from `rows` to rows + N, scaled as drafted cycles
measured it (the per-row work of a batch, which a plain step pays too, is not priced into nodes); the rows' own
part is what plain batched steps measured. The sizer picks N maximizing p_(1) + ... + p_(N) - rate * added(N),
where rate is what plain batched steps of as many rows decode per second, the alternative a draft must beat: as
the batch grows that rate grows, every node is priced higher, and trees shrink. Where drafting did not pay at
this many rows (its measured worth, per number of rows), cycles are plain batched steps, with a probe (a draft)
every PROBE_EVERY cycles or as far apart as keeps probes to PROBE_SHARE of the time, twice as far apart after
each probe that did not pay. A cycle whose rows' drafters catch up on what they have not seen (a generation's
first draft reads the whole prompt) is judged at what the batch's drafts cost otherwise, and only if it paid, as a
lone generation's first draft is: rows that have only stepped plain catch up at every first probe, and unjudged,
that probe was wasted. Every choice changes speed only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..tree.draft_tree import DraftTree
from .calibration import VerifyCosts
from .sizing import PROBE_BACKOFF, PROBE_EVERY, PROBE_SHARE, SMOOTHING, average

DEPTH_MARGIN = 2


@dataclass
class BatchSizer:
    costs: VerifyCosts
    scale: float = 0.0  # what draft nodes add to a forest cycle over what the calibration says (0: none measured)
    # Per number of rows (whether drafting pays at 2 rows says nothing of 8, whose plain steps are dearer):
    plain: dict[int, float] = field(default_factory=dict)  # a plain batched step's seconds, as measured
    gain: dict[int, float] = field(default_factory=dict)  # what drafting was worth over plain steps, in tokens
    drafting: dict[int, float] = field(default_factory=dict)  # seconds drafting and building, past catch-ups
    backoff: dict[int, int] = field(default_factory=dict)  # 2 ** (probes that failed in a row), to PROBE_BACKOFF
    skipped: int = 0  # plain cycles since the last draft
    probe_cost: float = 0.0  # seconds a drafted cycle takes past a plain step of as many rows (moving average)
    kept_depth: int | None = None  # the deepest node the last sizing kept (None: none sized yet)

    def draft_depth(self) -> int | None:
        """How deep the rows' next drafts go: DEPTH_MARGIN levels past the deepest node the last sizing kept, so
        trees can grow a level a cycle while no row drafts positions no tree reaches (a batch's trees are shallow:
        each draft position is a row of the drafter's forward for every row). None: as deep as the session asks."""
        return None if self.kept_depth is None else self.kept_depth + DEPTH_MARGIN

    def rate(self, rows: int, context: int) -> float:
        """Tokens per second a drafted cycle must beat: plain batched steps' of as many rows (one token a row)."""
        return rows / self.plain_seconds(rows, context)

    def plain_seconds(self, rows: int, context: int) -> float:
        """A plain batched step of `rows` rows: as measured, or the calibration's one-forward price."""
        return self.plain.get(rows) or float(self.costs.at(rows, context))

    def added(self, rows: int, nodes: np.ndarray | int, context: int) -> np.ndarray:
        """What `nodes` draft nodes add to a forest of `rows` roots: the calibration's curve from `rows` rows on,
        scaled as drafted cycles measured it (per-row work, which a plain step pays too, is not a node's)."""
        return (self.scale or 1.0) * self.calibrated(rows, nodes, context)

    def calibrated(self, rows: int, nodes: np.ndarray | int, context: int) -> np.ndarray:
        return self.costs.at(rows + np.asarray(nodes), context) - self.costs.at(rows, context)

    def will_draft(self, rows: int) -> bool:
        return self.worth(rows) >= 0 or self.skipped + 1 >= self.backoff.get(self.nearest(rows), 1) * self.every(rows)

    def every(self, rows: int) -> float:
        """Plain cycles between probes: PROBE_EVERY, or further apart where a probe costs more than PROBE_SHARE of
        that many plain steps (at 8 rows here a drafted cycle costs 2-3 plain steps: probing every 8 cycles took a
        fifth of the time)."""
        plain = self.plain.get(rows)
        return max(PROBE_EVERY, self.probe_cost / (PROBE_SHARE * plain)) if plain else PROBE_EVERY

    def worth(self, rows: int) -> float:
        """What drafting was worth at `rows` rows, or at the nearest number of rows measured (as rows leave, a
        batch that just found drafting does not pay at 8 would otherwise try again at 7, 6, ...); 0 before any."""
        return self.gain.get(self.nearest(rows), 0.0)

    def nearest(self, rows: int) -> int:
        return nearest(self.gain, rows)

    def pick(self, method: str, rows: int) -> str:
        """The method of the batch's next cycle: `method`, or "ar" while drafting does not pay (probing now and
        then)."""
        if self.will_draft(rows):
            self.skipped = 0
            return method
        self.skipped += 1
        return "ar"

    def size(self, trees: list[DraftTree], context: int) -> list[DraftTree]:
        """The prefixes of the rows' whole best-first trees (scores: calibrated log-acceptance) worth verifying
        together after about `context` tokens each."""
        rows = len(trees)
        probs = np.concatenate([np.exp(np.array(tree.scores[1:])) for tree in trees])
        owner = np.concatenate([np.full(len(tree) - 1, row) for row, tree in enumerate(trees)])
        order = np.argsort(-probs, kind="stable")  # each row's nodes keep their pop order: prefixes
        nodes = np.arange(len(order) + 1)
        rate = self.rate(rows, context)
        value = np.r_[0.0, np.cumsum(probs[order])] - rate * self.added(rows, nodes, context)
        best = int(np.argmax(value))
        counts = np.bincount(owner[order[:best]], minlength=rows)
        kept = [tree.prefix(int(count) + 1) for tree, count in zip(trees, counts)]
        self.kept_depth = max(max(tree.depths) for tree in kept)
        return kept

    def record(self, drafted: bool, rows: int, nodes: int, committed: int, seconds: float, drafting: float,
               context: int, catching_up: bool = False) -> None:
        """A batch cycle of `rows` rows verifying `nodes` nodes (roots included) committed `committed` tokens in
        `seconds`, `drafting` of them drafting and building (`catching_up`: some row's drafter on the prompt)."""
        if not drafted:
            self.plain[rows] = average(self.plain.get(rows, 0.0), seconds)
            return
        if catching_up:  # its verify as measured, its draft at what drafts cost without a catch-up
            if not self.drafting:
                return
            steady = self.drafting[nearest(self.drafting, rows)]
            seconds, drafting = seconds - drafting + steady, steady
        else:
            self.drafting[rows] = average(self.drafting.get(rows, 0.0), drafting)
        plain = self.plain_seconds(rows, context)
        added = float(self.calibrated(rows, nodes - rows, context))
        if added > 0:  # the nodes' own time, past what a plain step of these rows takes (or is priced at)
            # The first measurement stands alone: a batch's first trees, sized on the calibration's word, measured
            # 1.8x it at 4 rows here, and at 10% a cycle auto stopped drafting before its trees shrank.
            self.scale = average(self.scale, min(max((seconds - drafting - plain) / added, 0.5), 4.0))
        # What this draft was worth: the tokens past a plain step's one per row, less its time past a plain
        # step's at that step's rate (a plain step as the calibration prices it until one is measured: judged by
        # its own expectation instead, a batch whose drafts never pay would draft on and never measure one).
        worth = committed - rows - rows / plain * (seconds - plain)
        self.probe_cost = average(self.probe_cost, max(seconds - plain, 0.0))
        if catching_up and worth < 0:  # no verdict: the rows guessed where their drafters had seen least
            return
        # A batch cycle is every row's draft at once: more evidence than a lone generation's, so it weighs more (a
        # lucky probe at 8 rows otherwise kept losing drafts on for eight cycles here).
        known = self.nearest(rows)
        gain, backoff = self.gain.get(known, 0.0), self.backoff.get(known, 1)
        probing = gain < 0
        self.gain[rows] = gain + (1.0 if probing else min(SMOOTHING * rows, 0.5)) * (worth - gain)
        if probing:
            self.backoff[rows] = 1 if self.gain[rows] >= 0 else min(2 * backoff, PROBE_BACKOFF)


def nearest(known: dict[int, float], rows: int) -> int:
    """The number of rows in `known` closest to `rows` (the larger on a tie), or `rows` itself."""
    return min(known, key=lambda measured: (abs(measured - rows), -measured), default=rows)
