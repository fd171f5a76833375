"""Train a DFlash block-diffusion drafter for any supported target, on MLX (recipe: arXiv 2602.06036).

The drafter is dflash-mlx's own `DFlashDraftModel`, so what this trains loads wherever z-lab's checkpoints load.
It has a few decoder layers of the target's width. The hidden states of tapped target layers (spread from the 2nd
to the third-to-last) are concatenated, projected and normed, and enter every draft layer as extra keys and
values. A block is `[anchor, mask x (B-1)]`: bidirectional inside, the context visible up to the anchor. The
target's embedding and LM head are shared and stay frozen, as does the target, in its own dtype/quantization.

One training example is a whole sequence (prompt + the target's own answer): its tapped hidden states come from
one frozen target forward, and many random anchors in the answer are trained in one drafter forward, each block
seeing only its own context under a block-sparse mask. Position k of a block (k = 1..B-1) is weighted
exp(-(k-1)/gamma) in the cross-entropy, because early positions decide whether later ones are reached at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..config import DDTreeConfig
from ..loading.load import load
from ..models.registry import adapter_for
from .data import Example, read_answers, read_prompts, regenerate
from .drafter import (
    DrafterShape,
    TrainVocab,
    check_shape,
    choose_mask_token,
    default_gamma,
    export,
    new_drafter,
    start_from,
)
from .objective import block_loss, block_predictions, sample_anchors, usable
from .progress import show

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class TrainSettings:
    epochs: float = 6.0
    anchors: int = 64  # random anchors per sequence, trained in one forward
    accumulate: int = 4  # sequences per optimizer step
    lr: float = 6e-4
    warmup: float = 0.04  # share of the steps spent warming up, then cosine decay
    clip: float = 1.0
    gamma: float = 0.0  # 0: 7 for blocks of 16, 4 for blocks of 8 (the public recipe)
    max_len: int = 1024
    seed: int = 0
    checkpoint_every: int = 25
    # "full": the softmax runs over the whole vocabulary (the public recipe). "data": over the tokens that occur in
    # the training data only (every label is one); the LM head is most of a step's cost on a CPU and this is often
    # 5-10x fewer rows. Evaluation always uses the whole vocabulary, so it shows what this costs in acceptance.
    vocab: str = "full"
    # With vocab "data": only the `vocab_size` most frequent answer tokens (0: every token of the data). The draft
    # head's cost grows with its rows, while each new phase's data brings rare tokens it will almost never get right.
    vocab_size: int = 0

    def __post_init__(self) -> None:
        if self.vocab not in ("full", "data"):
            raise ValueError(f"vocab {self.vocab!r}: use 'full' or 'data'")
        if self.vocab_size < 0:
            raise ValueError(f"vocab_size {self.vocab_size}: use a positive size, or 0 for every token of the data")
        if self.vocab_size and self.vocab != "data":
            raise ValueError(f"vocab_size {self.vocab_size} caps vocab 'data' (--vocab data); the full vocabulary "
                             "has no size to choose")


class Trainer:
    """Resumable: every `checkpoint_every` steps the drafter, the optimizer and the step are saved to out_dir;
    a new Trainer on the same out_dir continues from there. The data order is a function of (seed, epoch)."""

    def __init__(self, target_model: Any, examples: list[Example], out_dir: str | Path, shape: DrafterShape,
                 settings: TrainSettings = TrainSettings(), init: str | Path | None = None):
        self.target = adapter_for(target_model)
        check_shape(self.target, shape)
        self.examples = usable(examples, settings.max_len, self.target.vocab_size)
        self.shape, self.settings = shape, settings
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.gamma = settings.gamma or default_gamma(shape.block_size)
        self.total_steps = max(1, math.ceil(settings.epochs * len(self.examples) / settings.accumulate))
        self.drafter = new_drafter(self.target, shape, settings.seed)
        if init is not None:
            start_from(self.drafter, Path(init))
        self.vocab = None
        if settings.vocab == "data":
            self.vocab = TrainVocab.of(self.target, self.examples, settings.vocab_size)
        warm = max(1, int(settings.warmup * self.total_steps))
        schedule = optim.join_schedules([optim.linear_schedule(0.0, settings.lr, warm),
                                         optim.cosine_decay(settings.lr, max(1, self.total_steps - warm))], [warm])
        self.optimizer = optim.AdamW(learning_rate=schedule)
        self.step = 0
        self.resume()

    # checkpoints
    def resume(self) -> None:
        state_file = self.out / "checkpoint.json"
        if not state_file.exists():
            return
        state = json.loads(state_file.read_text())
        if state["shape"] != asdict(self.shape):
            raise ValueError(f"{self.out} holds a checkpoint of another drafter shape {state['shape']}; use a new "
                             "output directory or the same settings")
        self.drafter.load_weights(str(self.out / "drafter.safetensors"))
        self.optimizer.init(self.drafter.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(mx.load(str(self.out / "optimizer.safetensors")).items()))
        self.step = state["step"]
        log = self.out / "log.jsonl"  # steps logged after the last checkpoint run again: drop their rows
        if log.exists():
            rows = [line for line in log.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            log.write_text("".join(row + "\n" for row in rows))

    def save(self) -> None:
        mx.save_safetensors(str(self.out / "drafter.safetensors"), dict(tree_flatten(self.drafter.parameters())))
        mx.save_safetensors(str(self.out / "optimizer.safetensors"), dict(tree_flatten(self.optimizer.state)))
        state = {"step": self.step, "total_steps": self.total_steps, "shape": asdict(self.shape),
                 "settings": asdict(self.settings)}
        (self.out / "checkpoint.json.tmp").write_text(json.dumps(state))
        (self.out / "checkpoint.json.tmp").replace(self.out / "checkpoint.json")  # the step only after the weights

    # data
    def examples_of_step(self, step: int) -> list[Example]:
        per_step, count = self.settings.accumulate, len(self.examples)
        items = []
        for i in range(step * per_step, (step + 1) * per_step):
            epoch, position = divmod(i, count)
            order = np.random.default_rng([self.settings.seed, epoch]).permutation(count)
            items.append(self.examples[order[position]])
        return items

    def target_hidden(self, example: Example, tokens: list[int]) -> mx.array:
        """The tapped layers' outputs for the whole sequence: one frozen target forward (no LM head) on first use,
        then read back from out_dir/hidden/ (float16), so later epochs skip the target."""
        path = self.out / "hidden" / (hashlib.sha1(f"{example.id}:{len(tokens)}".encode()).hexdigest() + ".safetensors")
        if not path.exists():
            _, hidden = self.target.forward(mx.array(tokens), self.target.make_cache(), self.drafter.target_layer_ids)
            path.parent.mkdir(exist_ok=True)
            partial = path.with_suffix(".partial.safetensors")  # a killed run leaves no torn file behind
            mx.save_safetensors(str(partial), {"hidden": hidden.astype(mx.float16)})
            partial.replace(path)
        return mx.load(str(path))["hidden"].astype(mx.float32)  # every epoch sees the same (stored) values

    def train(self, max_steps: int | None = None, progress: bool = True) -> list[dict]:
        """Train until the schedule ends (or `max_steps` more steps); returns this run's log rows."""
        step_fn = nn.value_and_grad(self.drafter, block_loss)
        rows, start = [], time.perf_counter()
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        while self.step < end:
            row = self.train_step(step_fn)
            rows.append(row)
            with open(self.out / "log.jsonl", "a") as log:
                log.write(json.dumps(row) + "\n")
            if self.step % self.settings.checkpoint_every == 0 or self.step == end:
                self.save()
            if progress:
                seconds = (time.perf_counter() - start) * self.step / len(rows)  # as if every step ran now
                show(self.step, self.total_steps, f"steps, loss {row['loss']:.3f}, acc@1 {row['accuracy'][0]:.2f}",
                     seconds)
        return rows

    def evaluate(self, examples: list[Example], anchors: int = 32, name: str | None = None) -> dict:
        """Held-out and teacher-forced, over blocks that fit inside the answer: top-1 accuracy per block position,
        and acceptance per position, the share of blocks whose first k draft tokens are all right (what one draft
        path gets accepted); their sum is the expected accepted length of a single path, before the bonus. `name`:
        the held-out set's, kept in the row."""
        rng = np.random.default_rng([self.settings.seed, 1 << 21])
        size = self.drafter.block_size - 1
        right, accepted, counted = np.zeros(size), np.zeros(size), np.zeros(size)
        for example in usable(examples, self.settings.max_len, self.target.vocab_size):
            tokens = (example.prompt + example.answer)[: self.settings.max_len]
            at = sample_anchors(rng, len(example.prompt), len(tokens) - size + 1, anchors)  # whole blocks only
            if at.size == 0:
                continue
            logits, labels, valid = block_predictions(self.drafter, self.target, mx.array(tokens),
                                                      self.target_hidden(example, tokens), at)
            correct = np.array((mx.argmax(logits, axis=-1) == labels) & valid)
            right += correct.sum(0)
            accepted += np.cumprod(correct, axis=1).sum(0)
            counted += np.array(valid).sum(0)
        acceptance = accepted / np.maximum(counted, 1)
        row = {"step": self.step, **({"set": name} if name else {}),
               "accuracy": (right / np.maximum(counted, 1)).round(4).tolist(),
               "acceptance": acceptance.round(4).tolist(), "expected_accepted": float(acceptance.sum())}
        with open(self.out / "eval.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
        return row

    def train_step(self, step_fn: Any) -> dict:
        rng = np.random.default_rng([self.settings.seed, 1 << 20, self.step])
        grads, losses = None, []
        correct = counted = 0
        for example in self.examples_of_step(self.step):
            tokens = (example.prompt + example.answer)[: self.settings.max_len]
            anchors = sample_anchors(rng, len(example.prompt), len(tokens), self.settings.anchors)
            (loss, right, count), g = step_fn(self.drafter, self.target, mx.array(tokens),
                                              self.target_hidden(example, tokens), anchors, self.gamma,
                                              self.vocab)
            grads = g if grads is None else tree_map_add(grads, g)
            mx.eval(loss, right, count, grads)
            losses.append(loss.item())
            correct, counted = correct + np.array(right), counted + np.array(count)
        grads, norm = optim.clip_grad_norm(tree_scale(grads, 1 / len(losses)), self.settings.clip)
        self.optimizer.update(self.drafter, grads)
        mx.eval(self.drafter.parameters(), self.optimizer.state)
        self.step += 1
        return {"step": self.step, "loss": float(np.mean(losses)), "grad_norm": norm.item(),
                "accuracy": (correct / np.maximum(counted, 1)).round(4).tolist()}


def tree_map_add(a: Any, b: Any) -> Any:
    return tree_map(lambda x, y: x + y, a, b)


def tree_scale(a: Any, factor: float) -> Any:
    return tree_map(lambda x: x * factor, a)


def train_drafter(model: str | None, prompts_file: str | Path, out_dir: str | Path, *, shape: DrafterShape,
                  settings: TrainSettings = TrainSettings(), mask_token_id: int | None = None,
                  max_prompts: int | None = None, answer_tokens: int = 256, gen_batch: int = 32,
                  temperature: float = 0.0, max_steps: int | None = None, eval_prompts: Sequence[str | Path] = (),
                  eval_count: int = 40, init: str | Path | None = None, answers_only: bool = False,
                  progress: bool = True, config: DDTreeConfig | None = None) -> Path:
    """Regenerate answers (out_dir/answers.jsonl), train (out_dir/train/), evaluate on each held-out prompt file
    (out_dir/train/eval.jsonl, a row per file named by its stem), export (out_dir/drafter/) and plot the curve
    (out_dir/curve.png); returns the export, or with `answers_only` the answers file once they are all there.
    Every stage resumes: run the same command again after an interrupt; `max_steps=0` only evaluates and exports.
    `config`: where the embedded model is converted (DDTreeConfig.cache_dir); default the environment's."""
    prompts = read_prompts(prompts_file)[:max_prompts]  # bad data fails before the model loads
    held_out = held_out_sets(eval_prompts, eval_count)
    target, tokenizer, _ = load(model, "prompt-lookup", config=config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    everything = [row for rows in held_out.values() for row in rows]
    for name, rows in (("answers.jsonl", prompts), ("eval_answers.jsonl", everything)):
        regenerate(target, tokenizer, rows, out / name, batch_size=gen_batch, max_tokens=answer_tokens,
                   temperature=temperature, progress=progress)
    examples = read_answers(out / "answers.jsonl", prompts)
    if answers_only:
        return out / "answers.jsonl"
    if mask_token_id is None:
        mask_token_id = choose_mask_token(tokenizer, examples)
    shape = DrafterShape(shape.block_size, shape.layers, shape.taps, mask_token_id)
    trainer = Trainer(target, examples, out / "train", shape, settings, init)
    trainer.train(max_steps=max_steps, progress=progress)
    for name, rows in held_out.items():
        row = trainer.evaluate(read_answers(out / "eval_answers.jsonl", rows), name=name)
        log.info("held-out acceptance per position, %s: %s", name, row["acceptance"])
    if (out / "train" / "log.jsonl").exists():
        plot_curve(out / "train" / "log.jsonl", out / "curve.png")
    return export(trainer.drafter, out / "drafter", vocab=trainer.vocab.ids if trainer.vocab else None)


def held_out_sets(files: Sequence[str | Path], count: int) -> dict[str, list[tuple[str, Any]]]:
    """The first `count` prompts of each held-out file, by the file's stem. Their answers share one file, so each
    prompt's id is prefixed with its set's name (two files may both number their rows)."""
    sets: dict[str, list[tuple[str, Any]]] = {}
    for file in files:
        name = Path(file).stem
        if name in sets:
            raise ValueError(f"two held-out files are named {name!r}; give each set a file name of its own")
        sets[name] = [(f"{name}/{key}", prompt) for key, prompt in read_prompts(file)[:count]]
    return sets


def plot_curve(log: Path, png: Path) -> None:
    """Loss and per-position accuracy over steps (needs matplotlib: pip install 'ddtree-mlx[bench]')."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steps = np.array([r["step"] for r in rows])
    window = max(1, len(rows) // 40)  # one step is a few sequences: average over a window to see the trend
    smooth = lambda values: np.convolve(values, np.ones(window) / window, mode="valid")  # noqa: E731
    accuracy = np.array([r["accuracy"] for r in rows])
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps[window - 1 :], smooth([r["loss"] for r in rows]))
    left.set(xlabel="step", ylabel="weighted cross-entropy", yscale="log", title=f"loss (mean of {window} steps)")
    for k in range(0, accuracy.shape[1], max(1, accuracy.shape[1] // 5)):
        right.plot(steps[window - 1 :], smooth(accuracy[:, k]), label=f"position {k + 1}")
    right.set(xlabel="step", ylabel="top-1 accuracy", title="training accuracy per block position")
    right.legend()
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)
