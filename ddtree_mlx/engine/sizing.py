"""How big a tree to verify, cycle by cycle (DDTREE_TREE_BUDGET=auto): the size that commits the most tokens per second
on this machine, and whether to draft at all.

Value. E(n) = 1 + p_1 + ... + p_n, the tokens the best tree of n nodes commits on average, with each node's path
probability p_i as acceptance.py estimates it on this text.

Cost. V(n) = scale * c(n + 1, L): c is the verify cost measured once for this machine (calibration.VerifyCosts)
at the current context length L, and `scale` what whole cycles (besides drafting) take against it: their walk and
commit, other work on the machine, what the calibration missed. Three kinds of cycle are scaled apart: trees, a
drafted cycle that verifies the root alone, and a plain step that was not drafted, which runs as mlx-lm's loop
does, queued while the last one computes (a draft needs the root on the host first, so a drafted step cannot be).

Choice. The size maximizing E(n) - rate * V(n), where `rate` is the tokens per second decoding has been running at:
a node is worth verifying when the tokens it adds pay for its time at that rate (Dinkelbach's step towards the
highest tokens per second). n = 0 verifies the root alone, a plain decoding step.

Draft or not. Drafting costs time too (a DFlash drafter's forward). After each drafted cycle the sizer knows
what it was worth over a plain step: the tokens it committed past the one a step commits, less the time it took
past a queued plain step's S at the going rate, (k - 1) - rate * (t - S), its draft in t at what drafts cost on
average (a generation's first catches up on the prompt; that first draft, if it lost, is no verdict: it guesses
the answer's first tokens, the hardest). What happened, not what the estimate expected: an estimate learned on a
few lucky cycles would otherwise keep drafting on by its own word; but charged no more than a token past what a
draft sized to the root alone loses (a big tree that missed at its first node was the sizer's bet, which the
acceptance estimate answers). While the recent average says drafting does not pay, cycles are plain steps, with
a probe (a draft) every PROBE_EVERY cycles to notice when the text changes, or further apart where a draft costs
more than PROBE_SHARE of that many plain steps, so probing costs at most about that share (a generation's first
draft, which catches up on the prompt, priced as such); twice as far apart after each probe that did not pay (up
to PROBE_BACKOFF times). That share shrinks with what drafting could gain at best here (`upside`: every node
accepted): where a node costs nearly a plain step (the reference BLAS), a perfect draft is barely faster than a
step, and looking for one would cost more than it could find; where none could pay, nothing is drafted at all.
A probe is judged once verified, by what a draft is worth knowing what it showed, E(n*) - rate * V(n*) -
(1 - rate * S) less its drafting (a probe sized to nothing would otherwise never find that drafting pays again);
the drafts after it are averaged with it as equals until there are enough for the moving average (a probe that
hit once is one draft's word).
What a draft costs here carries over to the next generation with the same kind of drafter, and where drafts are
that dear, whether drafting paid (`carry`).
A drafter that costs almost nothing (prompt lookup) drafts during every queued plain step instead, on the host
while the device runs the step, so drafting resumes within a few cycles of drafts that would pay. Such a peeked
tree is also evidence for free: the plain steps after it produce the target's own tokens, which are exactly what
verifying it would have accepted, so acceptance keeps being learned while nothing is verified (without it, an
estimate learned on other text could keep trees off where they would pay, and never be corrected). Every drafted
tree is learned from the same way, built to the cap (`choose`): the nodes its verify tried are scored as the verify
decided them (its accepted tokens are the target's own), and the nodes sized out by the tokens the target produced
next. Deep nodes priced out by acceptance learned on other text, or every node at a long context, are still
scored, so the estimate follows this text where verifying alone would never try them.
Every choice here changes speed only: verify and walk keep the output the target's own.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..tree.build import Candidates, build_tree
from ..tree.draft_tree import DraftTree
from .acceptance import Acceptance
from .calibration import VerifyCosts
from .ranks import broadcast

SMOOTHING = 0.1  # weight of the newest cycle in the moving averages of time and tokens


PROBE_EVERY = 8  # while drafting does not pay, draft once every this many cycles at first,


PROBE_SHARE = 0.03  # or further apart where drafts are dear, so probes take at most about this share of the time
                    # (scaled by `upside` where a perfect draft would be less than twice as fast as a plain step)


PROBE_BACKOFF = 8  # probes that keep failing come at most this many times further apart


PEEK_SHARE = 0.05  # a drafter this cheap beside a cycle drafts during queued plain steps too (TreeSizer.peeked)


def average(old: float, new: float) -> float:
    """A moving average whose first measurement stands alone (0: no measurement yet)."""
    return new if old == 0 else old + SMOOTHING * (new - old)


@dataclass
class Peek:
    """A drafted tree (built to the cap: peeked during a plain step, or verified in part), followed down as the
    target produces the tokens after its root."""

    candidates: Candidates
    tree: DraftTree
    path: list[int] = field(default_factory=lambda: [0])
    done: bool = False

    def see(self, token: int) -> list[int]:
        """The target produced `token` next: the nodes it decides (the children of the path so far, tried as a
        verify would have tried them); the path goes on through the one spelling it, if any."""
        children = self.tree.children[self.path[-1]]
        child = children.get(token)
        if child is not None:
            self.path.append(child)
        self.done = child is None or not self.tree.children[child]
        return list(children.values())


@dataclass
class TreeSizer:
    costs: VerifyCosts
    cap: int  # the most draft nodes a tree may have (DDTREE_MAX_TREE_BUDGET)
    acceptance: Acceptance = field(default_factory=Acceptance)
    # Observed cycle time (besides drafting) over the calibration's verify time: a queued plain step, a drafted
    # cycle that verified the root alone, and trees (0: not measured yet, see `scaled`).
    step_scale: float = 1.0
    root_scale: float = 0.0
    scale: float = 0.0
    tokens: float = 1.0  # moving averages of tokens and seconds per cycle: their ratio is the rate
    seconds: float = 0.0
    drafting: float = 0.0  # moving average of seconds spent drafting and building a tree
    plain: float = 0.0  # moving average of a plain cycle's seconds (0: none measured yet)
    first: float = 0.0  # moving average of a generation's first draft, which catches the drafter up on the prompt
    drafts: int = 0  # drafted cycles in this generation
    gain: float = 0.0  # moving average of what a draft was worth over a plain step, in tokens
    judged: int = 0  # drafted cycles in `gain` since a probe's verdict (or the generation's start)
    last_gain: float = 0.0  # the newest draft's worth, before its cost
    skipped: int = 0  # plain cycles since the last draft
    backoff: int = 1  # 2 ** (probes that failed in a row), up to PROBE_BACKOFF
    probing: bool = False  # this cycle drafts only to check whether drafting pays again
    peeks: list[Peek] = field(default_factory=list)  # peeked trees whose outcome is not known yet
    group: Any = None  # tensor parallel: every rank decides from rank 0's timings (ranks.py)
    context: int = 0  # tokens in the cache: the prompt's length, then the last cycle's
    upside: float = 0.0  # the most a draft could be faster than a plain step by, as a share (`reckon`)

    def __post_init__(self) -> None:
        # Until cycles are measured: plain decoding's rate after the prompt (at 6K tokens half the rate at 32, and
        # a rate too high prices every node too high).
        self.seconds = float(self.costs.at(1, self.context))
        self.reckon()

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    def step_seconds(self, context: int) -> float:
        """What a plain step takes, queued behind the last one (not drafted)."""
        return self.step_scale * float(self.costs.at(1, context))

    def cycle_seconds(self, nodes: np.ndarray | int, context: int) -> np.ndarray:
        """What a drafted cycle verifying `nodes` draft nodes takes, besides drafting."""
        nodes = np.asarray(nodes)
        root = self.scaled(self.root_scale) * self.costs.at(1, context)
        return np.where(nodes == 0, root, np.maximum(self.scaled(self.scale) * self.costs.at(nodes + 1, context), root))

    def reckon(self) -> None:
        """`upside`: how much faster than a queued plain step a drafted cycle could ever be at the current context,
        every node of its tree accepted (n nodes commit n + 1 tokens), its draft at what later drafts cost (nothing
        until one is measured: a generation's first catches up on the prompt, and priced so it could rule drafting
        out for good). 0 or less: no draft can pay, whatever the text. Reckoned at a generation's start and when
        drafting stops paying, not every cycle: plain steps would pay three cost-curve lookups each, host work
        mlx-lm's loop does not have, and while drafts pay their verdicts say all there is to know."""
        nodes = np.arange(1, self.cap + 1)
        speed = (nodes + 1) / (self.cycle_seconds(nodes, self.context) + self.drafting)
        self.upside = float(speed.max(initial=0.0) * self.step_seconds(self.context)) - 1

    def scaled(self, scale: float) -> float:
        """A drafted kind of cycle not measured yet is taken to be off the calibration as much as plain steps
        are: at a long context the calibration's extrapolation is off for every kind alike, and a generation that
        verifies few trees would otherwise price them at the calibration's word for long."""
        return scale or self.step_scale

    # --- before drafting -------------------------------------------------------------------------------------

    def carry(self, last: TreeSizer, max_new_tokens: int) -> None:
        """A new generation with the kind of drafter `last` sized for, on the same target: what its proposals were
        worth and what drafts and plain steps cost (the machine's, not the text's) carry over. Whether drafting
        paid was the last text's: this one finds out for itself, its first cycle drafting as a first generation's
        does, unless that first draft (with the prompt to catch up on) costs more than PROBE_SHARE of this
        generation's plain steps (a short generation, a dear drafter): then the last verdict stands until a probe
        is due."""
        self.acceptance = last.acceptance
        self.acceptance.new_text()
        self.drafting, self.plain, self.first = last.drafting, last.plain, last.first
        self.reckon()
        if self.first > self.probe_share() * max_new_tokens * self.step():
            self.gain = last.gain

    def probe_share(self) -> float:
        """The share of the time probes may take: PROBE_SHARE, or that share of what drafting could gain at best
        where a perfect draft would be less than twice as fast as a plain step (`upside`); none where it would not
        be faster at all."""
        return PROBE_SHARE * min(max(self.upside, 0.0), 1.0)

    def probe_every(self) -> float:
        """Plain cycles from one probe to the next, from a draft's cost against a plain cycle's as measured (a
        calibration taken on a busier or idler machine would space them wrongly)."""
        return self.backoff * max(PROBE_EVERY, self.draft_seconds() / (self.probe_share() * self.step()))

    def draft_seconds(self) -> float:
        """What the next draft costs: a generation's first catches the drafter up on the prompt (a probe in a
        generation that kept the last one's verdict is that first draft); later ones as measured, or as the
        first until one is (a drafter that drafted once and stopped is not free to probe)."""
        return (self.first or self.drafting) if self.drafts == 0 else (self.drafting or self.first)

    def step(self) -> float:
        """A plain cycle's seconds: as measured, or the calibration's until one is."""
        return self.plain or self.step_seconds(self.context)

    def will_draft(self) -> bool:
        """While drafting pays, or a probe is due; never where no draft could pay (`upside`)."""
        return self.upside > 0 and (self.gain >= 0 or self.skipped + 1 >= self.probe_every())

    def pick(self, method: str) -> str:
        """The method of the next cycle: `method`, or "ar" while drafting does not pay."""
        if self.will_draft():
            self.probing, self.skipped = self.gain < 0, 0
            return method
        self.skipped += 1
        return "ar"

    # --- building --------------------------------------------------------------------------------------------

    def size(self, tree: DraftTree, context: int) -> DraftTree:
        """The best prefix of a best-first tree built on calibrated candidates (tree.scores are log-acceptance),
        verified after `context` tokens."""
        probs = np.exp(np.array(tree.scores[1 : self.cap + 1]))
        nodes = np.arange(len(probs) + 1)
        value = 1 + np.concatenate([[0.0], np.cumsum(probs)]) - self.rate * self.cycle_seconds(nodes, context)
        best = int(np.argmax(value))
        # What this draft was worth over not drafting (a plain step, queued: never worse than a drafted root alone,
        # so a draft whose best tree is the root is worth nothing), before what drafting it cost.
        self.last_gain = float(value[best] - max(1 - self.rate * self.step_seconds(context), value[0]))
        return tree.prefix(best + 1)

    def full_tree(self, candidates: Candidates, root: int) -> DraftTree:
        """The best-first tree to the cap on calibrated candidates (its prefixes are the trees `size` chooses from)."""
        return build_tree(self.acceptance.calibrate(candidates), root, self.cap)

    def choose(self, candidates: Candidates, root: int, context: int) -> DraftTree:
        """The tree a drafted cycle verifies. The whole tree, to the cap, is followed as a peek is (`produced`):
        the tokens the target commits score the nodes verified and those sized out alike, so a draft sized to
        nothing, or to a shallow tree, still teaches what its deeper nodes were worth."""
        return self.size(self.follow(candidates, root), context)

    def follow(self, candidates: Candidates, root: int) -> DraftTree:
        """The whole tree to the cap, followed from now on as the target produces tokens (`produced`); a batch sizes
        its rows' trees together from these (batch_sizing.py)."""
        tree = self.full_tree(candidates, root)
        if len(tree) > 1:
            self.peeks.append(Peek(candidates, tree))
        return tree

    def can_peek(self) -> bool:
        return self.draft_seconds() < PEEK_SHARE * self.seconds and self.upside > 0

    def drafted(self, seconds: float) -> None:
        """Drafting and building a tree took `seconds` (the first measurement stands alone: 0 is no estimate)."""
        self.drafting = average(self.drafting, seconds)

    def net_gain(self) -> float:
        """The newest draft's worth minus what drafting costs, in tokens."""
        return self.last_gain - self.rate * self.drafting

    def peeked(self, seconds: float) -> None:
        """A draft chosen (`choose`: sized, and followed as the next cycles produce tokens) in `seconds` during a
        queued plain step, while the device ran it: what drafting would have been worth, without a probe's cost.
        Peeks come every plain cycle, so each one moves the average (one optimistic draft alone does not turn
        drafting on; a run of good ones does within a few cycles)."""
        (seconds,) = self.shared(seconds)
        self.drafted(seconds)
        self.gain += SMOOTHING * (self.net_gain() - self.gain)
        if self.gain >= 0:
            self.backoff = 1

    # --- after the cycle -------------------------------------------------------------------------------------

    def produced(self, tokens: list[int]) -> None:
        """A cycle committed `tokens`: each followed tree learns what verifying it would have accepted, token by
        token (evidence as soon as each depth is known, not once the whole tree is), in one update per tree: a node
        tried at a token is accepted if it is on the path once all are seen."""
        if self.peeks:
            self.acceptance.fade()
        for peek in self.peeks:
            tried = [node for token in tokens if not peek.done for node in peek.see(token)]
            if tried:
                self.acceptance.observe(peek.candidates, peek.tree, tried, peek.path)
        self.peeks = [peek for peek in self.peeks if not peek.done]

    def record(self, candidates: Candidates | None, tree: DraftTree, committed: int, seconds: float, drafting: float,
               context: int) -> None:
        """A cycle ended: `committed` tokens in `seconds`, `drafting` of them spent drafting and building."""
        seconds, drafting = self.shared(seconds, drafting)
        self.context = context
        self.tokens += SMOOTHING * (committed - self.tokens)
        self.seconds += SMOOTHING * (seconds - self.seconds)
        ratio = (seconds - drafting) / float(self.costs.at(len(tree), context))
        if candidates is None:
            self.step_scale += SMOOTHING * (ratio - self.step_scale)  # from the calibration's word: 1
            self.plain = average(self.plain, seconds)
        elif len(tree) == 1:
            self.root_scale = average(self.root_scale, ratio)
        else:
            self.scale = average(self.scale, ratio)
        if candidates is not None:
            if self.drafts:
                self.drafted(drafting)
            else:  # its catch-up on the prompt is the generation's cost, paid once, not each draft's
                self.first = average(self.first, drafting)
            self.drafts += 1
            if self.probing:  # its verdict is what drafting is worth knowing what it just saw, as the next draft would
                self.size(self.full_tree(candidates, 0), context)
                gain = self.net_gain()
            else:  # what it gained over a queued plain step, its draft at what drafts cost (`overtime`)
                gain = max(committed - 1 - self.overtime(seconds - drafting, context), self.least_gain(context))
            if self.drafts == 1 and not self.probing and gain < 0:
                # A generation's first draft that lost is no verdict on its text: it guesses the answer's first
                # tokens, the hardest (no lookup match yet, a drafter just caught up on the prompt), often sized to
                # the root alone; standing alone, it stopped drafting until a probe on text where trees paid. One
                # that paid despite that counts: ignored, a root-alone draft after seven accepted tokens stopped
                # drafting for 24 plain steps on GSM8K (BENCHMARKS.md).
                return
            # A probe's verdict stands alone (averaged with the cycles that stopped drafting, a changed text would
            # need many probes to be believed); the drafts after it count as much as it does, until there are
            # enough of them for the moving average.
            self.judged = 1 if self.probing else self.judged + 1
            self.gain += max(SMOOTHING, 1 / self.judged) * (gain - self.gain)
            if self.probing:
                self.backoff = 1 if self.gain >= 0 else min(2 * self.backoff, PROBE_BACKOFF)
            if self.gain < 0:  # plain steps from here on: what they read of `upside`, with drafts as measured now
                self.reckon()

    def least_gain(self, context: int) -> float:
        """The most a draft's verdict is charged: what a draft sized to the root alone loses against a queued plain
        step, and one token more. A tree that loses more than a token's time past the root alone was a big bet of
        the sizer's on what the drafter said (a 31-node tree that missed at its first node), which the acceptance
        estimate answers by sizing the next trees down; charged in full to drafting itself, one such miss among
        drafts that paid stopped drafting until a probe (BENCHMARKS.md). A tree's ordinary losses stay in full."""
        return -self.overtime(float(self.cycle_seconds(0, context)), context) - 1

    def overtime(self, verifying: float, context: int) -> float:
        """In tokens at the going rate: what a drafted cycle verifying for `verifying` seconds takes past a queued
        plain step, its draft at what drafts cost (`draft_seconds`: after a generation's first draft, the average of
        later ones, or the first's, catch-up and all, until one is measured)."""
        return self.rate * (verifying + self.draft_seconds() - self.step_seconds(context))

    def shared(self, *seconds: float) -> list[float]:
        """Sharded: times this rank measured become rank 0's on every rank (one small all-reduce) as they come in,
        so every rank decides alike from them: whether to draft, probe or peek, and what size (a rank that drafted
        while another stepped would pair no collective)."""
        return list(seconds) if self.group is None else broadcast(list(seconds), self.group)

    def report(self) -> dict:
        return {"sizes": list(self.costs.sizes), "seconds": [round(s, 6) for s in self.costs.seconds],
                "verified_sizes": [int(s) for s in self.costs.frontier[0]],
                "per_token": [float(f"{s:.3g}") for s in self.costs.per_token], "scale": round(self.scale, 3),
                "root_scale": round(self.root_scale, 3), "step_scale": round(self.step_scale, 3)}
