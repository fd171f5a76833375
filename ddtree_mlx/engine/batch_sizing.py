"""How big the trees of a batch are (DDTREE_TREE_BUDGET=auto with several rows): one choice for all of them, priced
on the forest's total rows.

A batch verifies every row's tree in one forward, so what a node costs is what one more row of that forward costs:
the measured verify curve c(n, L) (calibration.VerifyCosts) at n = all rows' nodes, roots included. Each row's
tree is built best first to the cap on its own calibrated candidates (TreeSizer.follow, which also keeps learning
what its drafts are worth), so its nodes' path probabilities p fall as they are popped (a child's never above its
parent's). Taking the N most probable nodes no deeper than D over all rows gives each row a tree, and the batch
commits on average

    E(N, D) = rows + p_(1) + ... + p_(N)

tokens. What the N nodes add to the cycle is the curve's rise from `rows` to rows + N, scaled as drafted cycles
measured it (the per-row work of a batch, which a plain step pays too, is not priced into nodes); the rows' own
part is what plain batched steps measured. Drafting D levels costs too: each draft position is a row of the
drafter's forward for every row (here at 4 rows a level was ~2 ms, 12.5 ms at depth 1 to 27 at depth 7), and the
next drafts reach as deep as the trees kept, so trees D deep are charged D levels at what a level was measured to
cost (`DraftCost`, a line through the batch's drafts). The sizer picks N and D maximizing

    p_(1) + ... + p_(N) - rate * (added(N) + level * D),

where rate is what plain batched steps of as many rows decode per second, the alternative a draft must beat: as
the batch grows that rate grows, every node and level is priced higher, and trees shrink. The next drafts reach a
level past the trees kept, so trees can grow a level a cycle (reaching two past trees that used every level drafted
paid for levels the next trees mostly cut: at 4 rows here its 4-node forests drafted for 22 ms, median, where
one-level drafts took 11).

Where the sizer's trees did not pay at this many rows (their measured worth, per number of rows), cycles are "lean":
each row's first-choice token, one level deep, the cheapest draft there is, judged on its own; where those did not
pay either, plain batched steps. The trees come back on a probe every PROBE_EVERY cycles or as far apart as keeps
what probes lose to PROBE_SHARE of the plain steps' tokens, twice as far apart after each probe that did not pay; a
probe that pays clears lean's verdict too. (At 4 rows here auto's gate had stepped plain in 82 of 198 cycles, judging
drafting by its own dearer trees, where lean cycles paid: with lean cycles and the shorter reach, 1.031x our `ar`
where auto did 0.975, one A/B of 4 waves x 3 rounds, ahead in every round.) A cycle whose rows' drafters read
more than the last cycle's tokens (the prompt, at a generation's first draft; at a probe, the plain steps' since
they last drafted) is judged at what the batch's drafts cost otherwise: that reading is paid once when drafting
starts (at 4 rows here, a probe after some 25 plain steps drafted for 114-204 ms where drafts took ~20; judged at
that, every probe lost, probes came further apart and cost more still). A generation's first draft is judged only
if it paid, as a lone generation's is: it guesses where the drafters have seen least. Every choice changes speed only.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..tree.draft_tree import DraftTree
from .calibration import VerifyCosts
from .sizing import PROBE_BACKOFF, PROBE_EVERY, PROBE_SHARE, SMOOTHING, average

WINDOW = 32  # the recent drafts a draft cost's line goes through
PAIRS = 3  # pairs of drafts of different depths its slope needs (before, a level costs the prior)
STALL = 2.0  # a drafted cycle's time past a plain step this many times the usual counts at that


@dataclass
class DraftCost:
    """What a batch's drafts take (drafting and building) against the depth they drafted: a Theil-Sen line through
    the last WINDOW drafts (its slope the median of the slopes between drafts of different depths, its height the
    median of what is left). The slope is what a level costs; until PAIRS pairs of drafts differ in depth it is
    `prior`, half the first draft's seconds spread over its levels (a level was 30-50% of a depth-6 draft at 2-8
    rows here). Medians, because drafts stall now and then: at 4 rows here two drafts of 63 and 123 ms, where drafts
    took 12-27, set a least-squares slope to 30 ms a level, every tree was cut to its root, and the batch stepped
    plain for the rest of its wave."""

    prior: float
    drafts: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))

    @classmethod
    def first(cls, depth: int, seconds: float) -> "DraftCost":
        cost = cls(prior=seconds / (2 * max(depth, 1)))
        cost.add(depth, seconds)
        return cost

    def add(self, depth: int, seconds: float) -> None:
        self.drafts.append((depth, seconds))

    @property
    def level(self) -> float:
        return self.line()[1]

    def at(self, depth: int) -> float:
        """A draft's seconds at `depth` levels, on the line."""
        height, level = self.line()
        return max(height + level * depth, 0.0)

    def line(self) -> tuple[float, float]:
        """The line's height (seconds at depth 0) and slope."""
        depths, seconds = np.array(self.drafts, dtype=float).reshape(-1, 2).T
        first, second = np.triu_indices(len(depths), 1)
        apart = depths[first] != depths[second]
        level = self.prior
        if apart.sum() >= PAIRS:
            slopes = (seconds[second] - seconds[first])[apart] / (depths[second] - depths[first])[apart]
            level = max(float(np.median(slopes)), 0.0)
        return (float(np.median(seconds - level * depths)) if len(depths) else 0.0), level


@dataclass
class BatchSizer:
    costs: VerifyCosts
    scale: float = 0.0  # what draft nodes add to a forest cycle over what the calibration says (0: none measured)
    # Per number of rows (whether drafting pays at 2 rows says nothing of 8, whose plain steps are dearer):
    plain: dict[int, float] = field(default_factory=dict)  # a plain batched step's seconds, as measured
    gain: dict[int, float] = field(default_factory=dict)  # what drafting was worth over plain steps, in tokens
    draft_costs: dict[int, DraftCost] = field(default_factory=dict)  # drafting and building, not behind
    backoff: dict[int, int] = field(default_factory=dict)  # 2 ** (probes that failed in a row), to PROBE_BACKOFF
    lean: dict[int, float] = field(default_factory=dict)  # what lean cycles were worth, where trees did not pay
    leaning: bool = False  # the cycle picked is lean: one node a row, one level deep
    skipped: int = 0  # cycles since the trees last drafted
    excess: float = 0.0  # seconds a drafted cycle takes past a plain step of as many rows (moving average)
    reach: int | None = None  # how deep the trees' next drafts go (None: as the session asks, before any sizing)

    def level(self, rows: int) -> float:
        """Seconds a level of drafting costs at `rows` rows (or the nearest measured); 0 before any draft."""
        cost = self.draft_costs.get(nearest(self.draft_costs, rows))
        return cost.level if cost is not None else 0.0

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
        """Plain cycles between probes: PROBE_EVERY, or further apart where a probe loses more than PROBE_SHARE of
        that many plain steps' tokens (what it lost: its worth below zero, its tokens counted; at 8 rows here a probe
        lost 1-2 plain steps' tokens). Priced at its whole time past a plain step instead, a probe at 4 rows came
        every ~25 cycles, a whole wave of plain steps after one stall."""
        return max(PROBE_EVERY, -self.worth(rows) / (PROBE_SHARE * rows))

    def worth(self, rows: int) -> float:
        """What drafting was worth at `rows` rows, or at the nearest number of rows measured (as rows leave, a
        batch that just found drafting does not pay at 8 would otherwise try again at 7, 6, ...); 0 before any."""
        return self.gain.get(self.nearest(rows), 0.0)

    def nearest(self, rows: int) -> int:
        return nearest(self.gain, rows)

    def pick(self, method: str, rows: int) -> str:
        """The method of the batch's next cycle: `method` (with the sizer's trees, or lean where they did not pay and
        lean cycles did), or "ar" where neither pays (probing the trees now and then)."""
        self.leaning = False
        if self.will_draft(rows):
            self.skipped = 0
            return method
        self.skipped += 1
        self.leaning = self.lean.get(nearest(self.lean, rows), 0.0) >= 0
        return method if self.leaning else "ar"

    @property
    def depth(self) -> int | None:
        """How deep the next drafts go: one level for a lean cycle, else the trees' reach (None: as deep as the
        session asks, before any sizing)."""
        return 1 if self.leaning else self.reach

    def size(self, trees: list[DraftTree], context: int) -> list[DraftTree]:
        """The rows' trees worth verifying together after about `context` tokens each: of each row's whole best-first
        tree (scores: calibrated log-acceptance), its first nodes no deeper than a depth D, the same for all; in a
        lean cycle, each row's first node."""
        if self.leaning:
            return [tree.prefix(2, 1) for tree in trees]
        rows = len(trees)
        probs = np.concatenate([np.exp(np.array(tree.scores[1:])) for tree in trees])
        depths = np.concatenate([np.array(tree.depths[1:], dtype=int) for tree in trees])
        owner = np.concatenate([np.full(len(tree) - 1, row) for row, tree in enumerate(trees)])
        rate, level = self.rate(rows, context), self.level(rows)
        best, depth_kept, counts = 0.0, 0, np.zeros(rows, dtype=int)
        deepest = int(depths.max(initial=0))
        for depth in range(1, deepest + 1):
            within = np.flatnonzero(depths <= depth)
            order = within[np.argsort(-probs[within], kind="stable")]  # each row's nodes keep their pop order
            nodes = np.arange(len(order) + 1)
            value = np.r_[0.0, np.cumsum(probs[order])] - rate * (self.added(rows, nodes, context) + level * depth)
            if value.max() > best:
                best, depth_kept = float(value.max()), depth
                counts = np.bincount(owner[order[: int(np.argmax(value))]], minlength=rows)
        kept = [tree.prefix(int(count) + 1, depth_kept) for tree, count in zip(trees, counts)]
        self.reach = depth_kept + 1
        return kept

    def record(self, drafted: bool, rows: int, nodes: int, committed: int, seconds: float, drafting: float,
               context: int, *, depth: int = 1, behind: bool = False, first: bool = False) -> None:
        """A batch cycle of `rows` rows verifying `nodes` nodes (roots included) committed `committed` tokens in
        `seconds`, `drafting` of them drafting `depth` levels deep and building (`behind`: some row's drafter read
        more than the last cycle's tokens; `first`: some row's first draft, which reads its prompt)."""
        if not drafted:
            self.plain[rows] = average(self.plain.get(rows, 0.0), seconds)
            return
        plain = self.plain_seconds(rows, context)
        verify = seconds - drafting
        added = float(self.calibrated(rows, nodes - rows, context))
        if added > 0:  # the nodes' own time, past what a plain step of these rows takes (or is priced at)
            # The first measurement stands alone: a batch's first trees, sized on the calibration's word, measured
            # 1.8x it at 4 rows here, and at 10% a cycle auto stopped drafting before its trees shrank.
            self.scale = average(self.scale, min(max((verify - plain) / added, 0.5), 4.0))
        if not behind and rows in self.draft_costs:
            self.draft_costs[rows].add(depth, drafting)
        elif not behind:
            self.draft_costs[rows] = DraftCost.first(depth, drafting)
        if not self.draft_costs:  # a catch-up before any draft: nothing to price its draft by yet
            return
        # Judged at what a draft this deep costs (its verify as measured): a catch-up's reading is paid once when
        # drafting starts, and one stalled draft (180 ms at 4 rows here, where drafts took 20) is no verdict.
        seconds = verify + self.draft_costs[nearest(self.draft_costs, rows)].at(depth)
        if self.excess:  # so is one stalled verify (290 ms at 4 rows here, where drafted cycles took ~130)
            seconds = min(seconds, plain + STALL * self.excess)
        # What this draft was worth: the tokens past a plain step's one per row, less its time past a plain
        # step's at that step's rate (a plain step as the calibration prices it until one is measured: judged by
        # its own expectation instead, a batch whose drafts never pay would draft on and never measure one).
        worth = committed - rows - rows / plain * (seconds - plain)
        self.excess = average(self.excess, max(seconds - plain, 0.0))
        if first and worth < 0:  # no verdict: the rows guessed where their drafters had seen least
            return
        if self.leaning:
            lean = self.lean.get(nearest(self.lean, rows), 0.0)
            self.lean[rows] = lean + weight(rows) * (worth - lean)
            return
        known = self.nearest(rows)
        gain, backoff = self.gain.get(known, 0.0), self.backoff.get(known, 1)
        probing = gain < 0
        self.gain[rows] = gain + (1.0 if probing else weight(rows)) * (worth - gain)
        if probing:
            self.backoff[rows] = 1 if self.gain[rows] >= 0 else min(2 * backoff, PROBE_BACKOFF)
            if self.gain[rows] >= 0:  # the rows changed: when trees stop paying again, lean gets a fresh trial
                self.lean.pop(nearest(self.lean, rows), None)


def weight(rows: int) -> float:
    """How much a cycle of `rows` rows moves a verdict: a batch cycle is every row's draft at once, more evidence
    than a lone generation's (a lucky probe at 8 rows otherwise kept losing drafts on for eight cycles here)."""
    return min(SMOOTHING * rows, 0.5)


def nearest(known: dict[int, float], rows: int) -> int:
    """The number of rows in `known` closest to `rows` (the larger on a tie), or `rows` itself."""
    return min(known, key=lambda measured: (abs(measured - rows), -measured), default=rows)
