"""What a drafter's proposals are worth to this target, learned online.

Value. The heap pops nodes best first, so the first n pops are the best tree of n nodes, and node i adds its path
probability p_i to the tokens a cycle commits on average: E(n) = 1 + p_1 + ... + p_n. A drafter's probabilities
are not what the target accepts (a DFlash drafter is trained on each position alone, not on the path; prompt
lookup's are match weights), so this module learns what they are worth on this text: per depth and probability
bucket, how often a node whose parent was accepted was accepted too, starting from the drafter's own word, scaled
down by as much as the drafter overstates over all its buckets (a claim seen once or never borrows that)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Container

import numpy as np

from ..tree.build import Candidates
from ..tree.draft_tree import DraftTree

EDGES = np.array([0.0, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97, 1.0])  # drafter probability buckets


CENTERS = (EDGES[:-1] + EDGES[1:]) / 2


KNOTS = np.r_[0.0, CENTERS]  # calibration interpolates between bucket centres, from (0, 0)


PRIOR = 1.0  # the drafter's own probability (or the depth above's estimate) counts as this many observations


TRUST = 1.0  # the evidence CLAIM_WORTH stands for, in squared claimed probability (see overstatement)


CLAIM_WORTH = 0.8  # before any evidence, what a drafter's word is taken to be worth, as a share of it


MEMORY = 0.995  # per drafted cycle: old observations fade, so the estimate follows the text


RECENT_MEMORY = 0.9  # the same for the generation's own last few cycles


RECENT_PRIOR = 2.0  # the long-run estimate counts as this many recent observations


def isotonic(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `values` in weighted squared error (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [value, weight, points]
    for value, weight in zip(values, weights):
        blocks.append([value, weight, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (v2, w2, n2), (v1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return np.repeat([b[0] for b in blocks], [int(b[2]) for b in blocks])


def overstatement(hits: np.ndarray, trials: np.ndarray, claimed: np.ndarray, worth: float) -> float:
    """The factor (at most 1) by which what the drafter claims at a depth overstates what was accepted there, over
    all its buckets at once: the weighted least-squares slope of acceptance on the claim, through 0, starting from
    TRUST's worth of evidence that it is `worth` (CLAIM_WORTH at the first depth; deeper, the claim is the depth
    above's estimate, which carries it down). A bucket seen once or never (prompt lookup's near-certain
    0.985 on a single long match) borrows it: a drafter that overrates its 0.6s on this text likely overrates its
    0.98s too, and a long tree verified on an unchecked word can cost several plain steps for one token where
    nodes are dear (the reference BLAS). Drafters' top claims are rarely as good as their word (a DFlash drafter
    is trained on each position alone, lookup's weights are counts), hence CLAIM_WORTH before any evidence. It
    never raises a claim, and a well-observed bucket's own counts outweigh it."""
    return float(min(1.0, (hits @ claimed + TRUST * worth) / (trials @ claimed**2 + TRUST)))


def empty() -> np.ndarray:
    return np.zeros((0, len(CENTERS)))


@dataclass
class Acceptance:
    """P(a node is accepted | its parent was, the drafter gave it probability p, at depth d), per (d, bucket).

    Two sets of counts: the long run (over generations: a few dozen tokens are too few to learn from alone) and
    the last few cycles of this generation, with the long run as their prior. Text changes within and between
    generations (a copied passage after free prose), and how much the drafter is worth changes with it: the recent
    counts follow within a few cycles where the long run alone would take hundreds."""

    hits: np.ndarray = field(default_factory=empty)
    trials: np.ndarray = field(default_factory=empty)
    recent_hits: np.ndarray = field(default_factory=empty)
    recent_trials: np.ndarray = field(default_factory=empty)

    def rates(self, depths: int) -> np.ndarray:
        """[depths, buckets] estimates, made non-decreasing in p (weighted isotonic regression) so calibrating
        keeps each depth's order, as the heap needs: a well-observed bucket the drafter overrates pulls its
        sparsely observed neighbours down with it."""
        self.grow(depths)
        rates, prior = [], CENTERS  # a depth's prior is the depth above's estimate: deeper nodes are tried less
        counts = zip(self.hits[:depths], self.trials[:depths], self.recent_hits[:depths], self.recent_trials[:depths])
        for depth, (hits, trials, recent_hits, recent_trials) in enumerate(counts):
            prior = prior * overstatement(hits, trials, prior, 1.0 if depth else CLAIM_WORTH)
            prior = isotonic((hits + PRIOR * prior) / (trials + PRIOR), trials + PRIOR)
            recent_weight = recent_trials + RECENT_PRIOR
            rates.append(isotonic((recent_hits + RECENT_PRIOR * prior) / recent_weight, recent_weight))
        return np.array(rates).reshape(depths, len(CENTERS))

    def new_text(self) -> None:
        """A generation starts: its recent cycles are still to come."""
        self.recent_hits, self.recent_trials = np.zeros_like(self.hits), np.zeros_like(self.trials)

    def calibrate(self, candidates: Candidates) -> Candidates:
        """The same candidates with log-probabilities replaced by estimated acceptance (still sorted per depth)."""
        rates = self.rates(len(candidates.log_probs))
        probs = np.exp(candidates.log_probs)
        calibrated = [np.interp(row, KNOTS, np.r_[0.0, rate]) for row, rate in zip(probs, rates)]
        return Candidates(candidates.tokens, np.log(np.clip(np.reshape(calibrated, probs.shape), 1e-12, 1.0)))

    def observe(self, candidates: Candidates, tree: DraftTree, tried: list[int], accepted: Container[int]) -> None:
        """Each of the `tried` nodes (its parent was accepted) was accepted if it is in `accepted`."""
        self.grow(len(candidates.log_probs))
        depth = np.array([tree.depths[n] - 1 for n in tried], dtype=int)
        p = np.exp(candidates.log_probs[depth, [tree.ranks[n] for n in tried]])
        bucket = np.clip(np.searchsorted(EDGES, p, side="right") - 1, 0, len(CENTERS) - 1)
        for hits, trials in ((self.hits, self.trials), (self.recent_hits, self.recent_trials)):
            np.add.at(trials, (depth, bucket), 1.0)
            np.add.at(hits, (depth, bucket), [float(n in accepted) for n in tried])

    def fade(self) -> None:
        """Once per cycle that brought evidence: old observations count less."""
        for counts, memory in ((self.hits, MEMORY), (self.trials, MEMORY), (self.recent_hits, RECENT_MEMORY),
                               (self.recent_trials, RECENT_MEMORY)):
            counts *= memory

    def grow(self, depths: int) -> None:
        """Every set of counts has the same depths (new_text keeps them)."""
        if len(self.hits) < depths:
            pad = ((0, depths - len(self.hits)), (0, 0))
            self.hits, self.trials, self.recent_hits, self.recent_trials = (
                np.pad(counts, pad) for counts in (self.hits, self.trials, self.recent_hits, self.recent_trials))
