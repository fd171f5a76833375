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
pay either, plain batched steps. A probe tries the rung above, from plain steps lean cycles, from lean cycles the
trees, every PROBE_EVERY cycles or as far apart as keeps what it lost to PROBE_SHARE of the plain steps' tokens,
twice as far apart after each probe that did not pay; a tree probe that pays clears lean's verdict. Every verdict
weighs a cycle against plain steps, so the batch steps plain until one is measured (the calibration priced one at
0.7x the measured at 8 rows here). (At 4 rows here auto's gate had stepped plain in 82 of 198 cycles, judging
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
from typing import Any

import numpy as np

from ..tree.draft_tree import DraftTree
from .calibration import VerifyCosts
from .sizing import PROBE_BACKOFF, PROBE_EVERY, PROBE_SHARE, average

WINDOW = 32  # the recent drafts a draft cost's line goes through, and plain steps a step's time is the median of
PAIRS = 3  # pairs of drafts of different depths its slope needs (before, a level costs the prior)
STALL = 2.0  # a drafted cycle's time past a plain step this many times the usual counts at that
# A verdict (what the trees, or lean cycles, were worth) is the median of this many recent cycles' worths: a batch
# cycle is every row's draft at once, more evidence than a lone generation's, but one noisy cycle is no verdict (at
# 3 rows here one lean cycle judged at a moving average's weight sent the batch to plain steps for 40 cycles where
# lean and trees paid; weighed at 0.1, a lucky probe at 8 rows kept losing drafts on for eight cycles).
VERDICT = 5


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
    plain: dict[int, deque[float]] = field(default_factory=dict)  # recent plain batched steps' seconds
    gain: dict[int, deque[float]] = field(default_factory=dict)  # what the trees' recent cycles were worth (tokens)
    draft_costs: dict[int, DraftCost] = field(default_factory=dict)  # drafting and building, not behind
    backoff: dict[int, int] = field(default_factory=dict)  # 2 ** (probes that failed in a row), to PROBE_BACKOFF
    lean: dict[int, deque[float]] = field(default_factory=dict)  # what lean cycles were worth (trees did not pay)
    leaning: bool = False  # the cycle picked is lean: one node a row, one level deep
    skipped: int = 0  # cycles since the last probe, or since the trees last paid
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
        """A plain batched step of `rows` rows: the median of the last WINDOW measured at the nearest number of rows
        measured, moved to `rows` along the calibration's curve; the calibration's own price before any (at 8 rows
        here 149 ms where steps took 200-210: judged against it, lean cycles that paid were judged to lose). The
        median, because steps stall now and then: steps of 566 and 1678 ms among ones of 215-250 lifted a moving
        average so far that trees cut to their roots (drafting for nothing) were judged to pay."""
        known = nearest(self.plain, rows)
        price = float(self.costs.at(rows, context))
        if known not in self.plain:
            return price
        return float(np.median(self.plain[known])) * price / float(self.costs.at(known, context))

    def added(self, rows: int, nodes: np.ndarray | int, context: int) -> np.ndarray:
        """What `nodes` draft nodes add to a forest of `rows` roots: the calibration's curve from `rows` rows on,
        scaled as drafted cycles measured it (per-row work, which a plain step pays too, is not a node's)."""
        return (self.scale or 1.0) * self.calibrated(rows, nodes, context)

    def calibrated(self, rows: int, nodes: np.ndarray | int, context: int) -> np.ndarray:
        return self.costs.at(rows + np.asarray(nodes), context) - self.costs.at(rows, context)

    def every(self, rows: int) -> float:
        """Cycles between probes: PROBE_EVERY, or further apart where what the probe tries lost more than
        PROBE_SHARE of that many plain steps' tokens (its worth below zero, in tokens; at 8 rows here a tree probe
        lost 1-2 plain steps' tokens). Priced at its whole time past a plain step instead, a probe at 4 rows came
        every ~25 cycles, a whole wave of plain steps after one stall."""
        lean = self.lean_worth(rows)
        loss = -(self.worth(rows) if lean >= 0 else lean)
        return max(PROBE_EVERY, loss / (PROBE_SHARE * rows))

    def worth(self, rows: int) -> float:
        """What the trees were worth at `rows` rows, or at the nearest number of rows measured (as rows leave, a
        batch that just found drafting does not pay at 8 would otherwise try again at 7, 6, ...); 0 before any."""
        return verdict(self.gain, rows)

    def lean_worth(self, rows: int) -> float:
        """What lean cycles were worth where the trees did not pay at `rows` rows; 0 (worth a try) where they were
        not tried at as many: they cost little, and taken from the nearest number of rows, two rows' verdict from
        the end of a wave kept 4 rows on plain steps for 55 cycles here where lean cycles paid."""
        return verdict(self.lean, rows, near=False)

    def spacing(self, rows: int) -> int:
        """How many times further apart than `every` probes come: 2 ** (probes that failed in a row) at the nearest
        number of rows probed (read where the trees were judged instead, lean probes' failures at other numbers of
        rows were written and never read)."""
        return self.backoff.get(nearest(self.backoff, rows), 1)

    def pick(self, method: str, rows: int) -> str:
        """The method of the batch's next cycle: `method` with the sizer's trees where they pay, else lean where lean
        cycles pay, else "ar". Every `every` cycles a probe tries the rung above: the trees from lean cycles, lean
        cycles from plain steps (probing the trees from plain steps, one lean verdict lost on a noisy cycle kept
        a batch on plain steps for good here: its trees, priced after a dear first cycle, never paid)."""
        self.leaning = False
        if not self.plain:  # every verdict weighs a cycle against plain steps: measure them first
            return "ar"
        if self.worth(rows) >= 0:
            self.skipped = 0
            return method
        self.skipped += 1
        probe = self.skipped >= self.spacing(rows) * self.every(rows)
        if probe:
            self.skipped = 0
        lean = self.lean_worth(rows) >= 0
        self.leaning = lean != probe
        return method if lean or probe else "ar"

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
            self.plain.setdefault(rows, deque(maxlen=WINDOW)).append(seconds)
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
        # Lean cycles are judged at their own number of rows only (lean_worth), the trees at the nearest.
        verdicts, near = (self.lean, False) if self.leaning else (self.gain, True)
        if verdict(verdicts, rows, near) < 0:  # a probe: its verdict stands alone
            verdicts[rows] = deque([worth], maxlen=VERDICT)
            self.backoff[rows] = 1 if worth >= 0 else min(2 * self.spacing(rows), PROBE_BACKOFF)
            if worth >= 0 and not self.leaning:  # the rows changed: when trees stop paying again, lean gets a trial
                self.lean.pop(rows, None)
        else:  # the trees, at a number of rows not judged yet, carry on from the nearest one's recent worths
            carried = verdicts.get(nearest(verdicts, rows), ()) if near else ()
            verdicts.setdefault(rows, deque(carried, maxlen=VERDICT)).append(worth)


def verdict(verdicts: dict[int, deque[float]], rows: int, near: bool = True) -> float:
    """The median of the recent worths judged at `rows` rows, or (`near`) at the nearest number of rows judged; 0
    before any."""
    recent = verdicts.get(nearest(verdicts, rows) if near else rows)
    return float(np.median(recent)) if recent else 0.0


def nearest(known: dict[int, Any], rows: int) -> int:
    """The number of rows in `known` closest to `rows` (the larger on a tie), or `rows` itself."""
    return min(known, key=lambda measured: (abs(measured - rows), -measured), default=rows)
