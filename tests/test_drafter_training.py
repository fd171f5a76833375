"""Training a DFlash drafter on MLX: the block-sparse forward equals dflash-mlx's own drafter block by block, the
loss drops, a checkpoint resumes exactly, the export loads through dflash-mlx and generation stays lossless."""

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from tiny import VOCAB, greedy_reference, make_target

from ddtree_mlx import generate_ddtree_once
from ddtree_mlx.loading.load import load_dflash
from ddtree_mlx.models.registry import adapter_for
from ddtree_mlx.training.data import (
    Example,
    drop_torn_tail,
    read_answers,
    read_examples,
    read_prompts,
)
from ddtree_mlx.training.drafter import DrafterShape, TrainVocab, export, new_drafter
from ddtree_mlx.training.objective import block_loss, block_mask, block_predictions, draft_hidden
from ddtree_mlx.training.trainer import Trainer, TrainSettings, held_out_sets

SHAPE = DrafterShape(block_size=8, layers=1, taps=2, mask_token_id=VOCAB - 1)


@pytest.fixture(scope="module")
def llama():
    return make_target("llama")


@pytest.fixture(scope="module")
def examples(llama):
    """The target's own greedy answers to random prompts: on-policy data, as regenerate() makes."""
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, VOCAB - 8, 6)] for _ in range(12)]
    return [Example(str(i), p, greedy_reference(llama, p, 40)) for i, p in enumerate(prompts)]


def test_block_mask_equals_brute_force():
    anchors, size, context = [2, 5, 9], 4, 12
    mask = np.array(block_mask(mx.array(anchors), size, context))
    for query in range(len(anchors) * size):
        block = query // size
        for key in range(context + len(anchors) * size):
            visible = key < anchors[block] if key < context else (key - context) // size == block
            assert mask[query, key] == visible, (query, key)


@pytest.mark.parametrize("family", ["llama", "qwen3_5"])
def test_all_blocks_at_once_equal_dflash_mlx_one_block_at_a_time(family):
    target = adapter_for(make_target(family))
    drafter = new_drafter(target, DrafterShape(block_size=6, taps=2, mask_token_id=VOCAB - 1), seed=3)
    tokens = mx.array([int(t) for t in np.random.default_rng(1).integers(0, VOCAB, 30)])
    _, hidden = target.forward(tokens, target.make_cache(), drafter.target_layer_ids)
    anchors = mx.array([3, 11, 12, 25])
    together = draft_hidden(drafter, target, tokens, hidden, anchors)
    for j, anchor in enumerate(anchors.tolist()):
        block = mx.array([tokens[anchor].item()] + [drafter.mask_token_id] * 5)[None]
        alone = drafter(noise_embedding=target.embed(block), target_hidden=hidden[None, :anchor], cache=None)
        np.testing.assert_allclose(np.array(together[j]), np.array(alone[0]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("vocab", ["full", "data"])
def test_loss_drops(llama, examples, tmp_path, vocab):
    trainer = Trainer(llama, examples, tmp_path, SHAPE,
                      TrainSettings(epochs=20, anchors=16, accumulate=2, lr=3e-3, checkpoint_every=1000, vocab=vocab))
    rows = trainer.train(max_steps=60, progress=False)
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-5:]])
    assert last < 0.8 * first, (first, last)
    assert len(rows[-1]["accuracy"]) == SHAPE.block_size - 1
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 61))
    row = trainer.evaluate(examples[:4])
    acceptance = row["acceptance"]
    assert all(a >= b for a, b in zip(acceptance, acceptance[1:])) and acceptance[0] <= row["accuracy"][0]
    assert row["expected_accepted"] == pytest.approx(sum(acceptance), abs=1e-3) and acceptance[0] > 0.1  # chance is 1/128


@pytest.mark.parametrize("family,form", [("qwen3", "f32"), ("qwen3", "q4"), ("llama", "f32"), ("llama", "q4"),
                                         ("qwen3_5", "mixed")])
def test_head_rows_are_the_lm_heads_columns(family, form):
    """Tied (qwen3) and untied (llama, qwen3_5) heads, plain and quantized: the rows give the same logits."""
    target = adapter_for(make_target(family, form=form))
    h = mx.random.normal((5, target.hidden_size), key=mx.random.key(0)).astype(target.embed(mx.array([0])).dtype)
    ids = mx.array([3, 0, VOCAB - 1, 17])
    full = target.lm_head(h)[:, ids].astype(mx.float32)
    part = h.astype(mx.float32) @ target.head_rows(ids).astype(mx.float32).T
    np.testing.assert_allclose(np.array(part), np.array(full), rtol=2e-2 if form == "bf16" else 1e-4, atol=1e-3)


def test_data_vocabulary_is_the_full_softmax_restricted(llama, examples):
    """The fast path against the simple one: over every id it is the full loss; over the data's ids its logits
    are the full logits' columns and its labels point at the same tokens."""
    target = adapter_for(llama)
    drafter = new_drafter(target, SHAPE, seed=1)
    tokens = mx.array(examples[0].prompt + examples[0].answer)
    _, hidden = target.forward(tokens, target.make_cache(), drafter.target_layer_ids)
    anchors = mx.array([5, 9, 20])
    full_loss = block_loss(drafter, target, tokens, hidden, anchors, 4.0)
    every = TrainVocab.of(target, [Example("all", list(range(VOCAB)), [])])
    for a, b in zip(full_loss, block_loss(drafter, target, tokens, hidden, anchors, 4.0, every)):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-5)
    vocab = TrainVocab.of(target, examples)
    ids = np.flatnonzero(np.array(vocab.index) >= 0)
    assert 0 < len(ids) < VOCAB
    logits, labels, _ = block_predictions(drafter, target, tokens, hidden, anchors)
    part, indices, _ = block_predictions(drafter, target, tokens, hidden, anchors, vocab)
    np.testing.assert_allclose(np.array(part), np.array(logits)[..., ids], rtol=1e-5, atol=1e-5)
    assert (ids[np.array(indices)] == np.array(labels)).all()


def test_a_capped_vocabulary_is_the_most_frequent_answer_tokens_and_skips_the_rest(llama, examples):
    """Brute force: the ids are the most frequent answer tokens; a label outside them does not count, and the loss
    over the rest is the cross-entropy of the full logits' columns for those ids."""
    target = adapter_for(llama)
    drafter = new_drafter(target, SHAPE, seed=1)
    counts = Counter(t for e in examples for t in e.answer)
    vocab = TrainVocab.of(target, examples, size=6)
    cut = sorted(counts.values(), reverse=True)[5]
    assert len(vocab.ids) == 6 and all(counts[t] >= cut for t in vocab.ids)
    assert {t for t in counts if counts[t] > cut} <= set(vocab.ids)
    tokens = mx.array(examples[0].prompt + examples[0].answer)
    _, hidden = target.forward(tokens, target.make_cache(), drafter.target_layer_ids)
    anchors = mx.array([5, 9, 20, 40])
    logits, labels, valid = (np.array(a) for a in block_predictions(drafter, target, tokens, hidden, anchors))
    part, indices, counted = (np.array(a) for a in block_predictions(drafter, target, tokens, hidden, anchors, vocab))
    inside = np.isin(labels, vocab.ids)
    assert inside.any() and (valid & ~inside).any()  # both kinds of label occur
    assert (counted == (valid & inside)).all()
    assert (np.array(vocab.ids)[indices[counted]] == labels[counted]).all()
    np.testing.assert_allclose(part, logits[..., vocab.ids], rtol=1e-5, atol=1e-5)
    columns = logits[..., vocab.ids].astype(np.float64)
    log_probs = columns - np.logaddexp.reduce(columns, axis=-1, keepdims=True)
    weights = np.exp(-np.arange(SHAPE.block_size - 1) / 4.0)[None] * counted
    picked = np.take_along_axis(log_probs, indices[..., None], -1)[..., 0]
    expected = -(picked * weights).sum() / weights.sum()
    loss, right, count = block_loss(drafter, target, tokens, hidden, anchors, 4.0, vocab)
    assert abs(loss.item() - expected) < 1e-4
    assert (np.array(count) == counted.sum(0)).all()


@pytest.mark.parametrize("family,form", [("llama", "q4"), ("qwen3_5", "bf16"), ("qwen3_5", "q8")])
def test_trains_against_targets_in_their_own_dtype(family, form, tmp_path):
    """The target stays frozen as Mac users run it (bf16, 4/8-bit); the drafter trains in float32 through the
    target's own (quantized) embedding and LM head."""
    model = make_target(family, form=form)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(0, VOCAB - 8, 6)] for _ in range(6)]
    examples = [Example(str(i), p, greedy_reference(model, p, 30)) for i, p in enumerate(prompts)]
    trainer = Trainer(model, examples, tmp_path, SHAPE, TrainSettings(epochs=5, anchors=8, accumulate=2, lr=3e-3))
    losses = [row["loss"] for row in trainer.train(max_steps=12, progress=False)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_resume_after_an_interrupt_continues_exactly(llama, examples, tmp_path):
    settings = TrainSettings(epochs=2, anchors=8, accumulate=2, lr=3e-3, checkpoint_every=3)
    straight = Trainer(llama, examples, tmp_path / "straight", SHAPE, settings)
    straight.train(max_steps=6, progress=False)
    interrupted = Trainer(llama, examples, tmp_path / "resumed", SHAPE, settings)
    interrupted.train(max_steps=3, progress=False)  # checkpoint at step 3; then killed after logging step 4:
    with open(tmp_path / "resumed" / "log.jsonl", "a") as log:
        log.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    resumed = Trainer(llama, examples, tmp_path / "resumed", SHAPE, settings)  # a new process, same directory
    assert resumed.step == 3
    resumed.train(max_steps=3, progress=False)
    log = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_leaves(straight.drafter.parameters()), _leaves(resumed.drafter.parameters())):
        assert mx.allclose(a, b, rtol=1e-6, atol=1e-7).item()


def _leaves(tree):
    from mlx.utils import tree_flatten

    return [value for _, value in tree_flatten(tree)]


def test_export_loads_through_dflash_mlx_and_generates_losslessly(llama, examples, tmp_path):
    trainer = Trainer(llama, examples, tmp_path / "run", SHAPE, TrainSettings(epochs=1, anchors=8, accumulate=2))
    trainer.train(max_steps=4, progress=False)
    out = export(trainer.drafter, tmp_path / "drafter", dtype=mx.float32, vocab=[9, 2, 5])
    config = json.loads((out / "config.json").read_text())
    assert config["block_size"] == 8 and config["num_target_layers"] == 3
    assert json.loads((out / "draft_vocab.json").read_text()) == {"token_ids": [2, 5, 9]}
    assert config["dflash_config"] == {"target_layer_ids": trainer.drafter.target_layer_ids,
                                       "mask_token_id": VOCAB - 1}
    drafter = load_dflash(str(out))
    for a, b in zip(_leaves(drafter.parameters()), _leaves(trainer.drafter.parameters())):
        assert mx.array_equal(a, b).item()
    prompt = examples[0].prompt
    result = generate_ddtree_once(target_model=llama, draft_model=drafter, prompt_tokens=prompt,
                                  max_new_tokens=32, stop_token_ids=[], tree_budget=4)
    assert result["generated_token_ids"] == greedy_reference(llama, prompt, 32)


def test_the_draft_heads_log_probs_are_the_full_heads_over_its_vocabulary(llama, examples, tmp_path):
    """A drafter with a draft vocabulary computes only those rows of the head, over the whole block (the
    anchor's row dropped after, for BLAS's row blocks): per position, the log-softmax over those ids of what the
    target's full LM head gives on the draft positions alone."""
    from ddtree_mlx.loading.load import dflash_drafter

    trainer = Trainer(llama, examples, tmp_path / "run", SHAPE, TrainSettings(epochs=1, anchors=8, accumulate=2))
    trainer.train(max_steps=2, progress=False)
    drafter = dflash_drafter(str(export(trainer.drafter, tmp_path / "drafter", dtype=mx.float32,
                                        vocab=[9, 2, 5, 17, 40, 41])))
    target, prompt = adapter_for(llama), examples[0].prompt
    _, hidden = target.forward(mx.array(prompt), target.make_cache(), drafter.target_layer_ids)
    drafter.reset(target, prompt)
    got = drafter.log_probs(7, hidden)
    drafter.reset(target, prompt)
    block = mx.array([7] + [drafter.model.mask_token_id] * (drafter.block_size - 1))
    positions = drafter.model(noise_embedding=target.embed(block[None]), target_hidden=hidden[None],
                              cache=drafter.cache)[0, 1:]
    logits = target.lm_head(positions)[:, drafter.vocab]
    assert got.shape == (7, 6) and mx.allclose(got, logits - mx.logsumexp(logits, -1, keepdims=True), atol=1e-5).item()


def test_init_starts_from_an_export_of_the_same_shape(llama, examples, tmp_path):
    first = Trainer(llama, examples, tmp_path / "first", SHAPE, TrainSettings(epochs=1, anchors=8, accumulate=2))
    first.train(max_steps=2, progress=False)
    out = export(first.drafter, tmp_path / "drafter", dtype=mx.float32)
    second = Trainer(llama, examples, tmp_path / "second", SHAPE, TrainSettings(seed=5), init=out)
    for a, b in zip(_leaves(first.drafter.parameters()), _leaves(second.drafter.parameters())):
        assert mx.array_equal(a, b).item()
    with pytest.raises(ValueError, match="pass matching --block-size"):
        Trainer(llama, examples, tmp_path / "third", DrafterShape(6, 1, 2, VOCAB - 1), init=out)
    with pytest.raises(ValueError, match="no config.json"):
        Trainer(llama, examples, tmp_path / "fourth", SHAPE, init=tmp_path)
    with pytest.raises(ValueError, match="vocab 'some'"):
        TrainSettings(vocab="some")
    with pytest.raises(ValueError, match=r"vocab_size 100 caps vocab 'data' \(--vocab data\)"):
        TrainSettings(vocab_size=100)
    with pytest.raises(ValueError, match="vocab_size -1: use a positive size"):
        TrainSettings(vocab="data", vocab_size=-1)


def test_bad_input_fails_before_training(llama, examples, tmp_path):
    with pytest.raises(ValueError, match="leaves no draft positions"):
        DrafterShape(block_size=1, mask_token_id=0)
    with pytest.raises(ValueError, match="taps 9 > the target's 3 layers"):
        Trainer(llama, examples, tmp_path, DrafterShape(taps=9, mask_token_id=0))
    with pytest.raises(ValueError, match="outside the target vocabulary"):
        Trainer(llama, examples, tmp_path, DrafterShape(taps=2, mask_token_id=VOCAB))
    with pytest.raises(ValueError, match="token ids outside the target vocabulary"):
        Trainer(llama, [Example("x", [1, 2], [3, VOCAB + 5])], tmp_path, SHAPE)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt field"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2 has no 'prompt' text or chat 'messages'"):
        read_prompts(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.jsonl")
    for folder in "ab":
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "set.jsonl").write_text('{"prompt": "fine"}\n')
    with pytest.raises(ValueError, match="two held-out files are named 'set'"):
        held_out_sets([tmp_path / "a" / "set.jsonl", tmp_path / "b" / "set.jsonl"], 40)


def test_an_interrupted_write_does_not_swallow_the_next_example(tmp_path):
    answers = tmp_path / "answers.jsonl"
    answers.write_text(json.dumps({"id": "a", "prompt": [1], "answer": [2]}) + '\n{"id": "b", "prom')
    drop_torn_tail(answers)
    with open(answers, "a") as file:  # what regenerate appends next
        file.write(json.dumps({"id": "c", "prompt": [3], "answer": [4]}) + "\n")
    assert [example.id for example in read_examples(answers)] == ["a", "c"]


def test_a_phase_trains_on_its_own_prompts_answers(tmp_path):
    """answers.jsonl gathers every phase's answers; a phase's prompt file picks its own."""
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"id": key, "prompt": [1], "answer": [2]}) + "\n" for key in "abcd"))
    assert [example.id for example in read_answers(answers, [("d", "text"), ("b", "text"), ("z", "text")])] == ["b", "d"]
