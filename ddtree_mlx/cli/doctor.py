"""`ddtree-mlx doctor`: what this machine is, what ddtree-mlx runs on it, and whether generation here is exact.

Run it first on a new Mac, and attach `ddtree-mlx doctor --json` to a bug report. The exit status is 0 only if
every check passed: the Metal kernels' self-checks (where there is Metal) and a short lossless self-test, DDTree
against mlx-lm's own `stream_generate`, greedy, on the given model (default: the embedded SmolLM2).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

import mlx.core as mx
import mlx_lm
import numpy as np

from ..blas import blas_name
from ..config import DDTreeConfig
from ..engine.calibration import curve_path, read
from ..engine.generate import generate_ddtree_once
from ..kernels import dispatch
from ..kernels.check import DEFAULT_SHAPES
from ..kernels.guard import GUARD
from ..loading.load import encode_prompt, load
from ..models.registry import adapter_for
from .hybrid_check import hybrid_self_test

PROMPTS = ("Explain in two sentences why the sky is blue.",
           "Write a Python function that returns the n-th Fibonacci number.")
PACKAGES = ("ddtree-mlx", "mlx", "mlx-lm", "dflash-mlx")
SELF_TEST_BUDGET = 8  # draft nodes per tree in the self-test


def chip() -> str:
    if platform.system() == "Darwin":
        return _run(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _run(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def kernel_report(config: DDTreeConfig) -> dict[str, Any]:
    """Every Metal kernel variant checked in this process (the hybrid self-test's and small shapes of each head
    layout and dtype), where kernels can run; else which path runs and why."""
    if dispatch.kernel_maker() is None:
        return {"path": "twin", "reason": "no Metal GPU as the default device: the pure-MLX twin runs",
                "variants": [], "ok": True}
    dispatch.prepare(DEFAULT_SHAPES, config)
    variants = [check.as_dict() for check in GUARD.checks.values()]
    return {"path": dispatch.kernel_path(config), "variants": variants, "failed": dict(GUARD.off),
            "ok": all(v["ok"] for v in variants) and not GUARD.off}


def self_test(model: str | None, draft: str | None, config: DDTreeConfig, max_tokens: int = 16) -> dict[str, Any]:
    """DDTree's greedy tokens against mlx-lm's stream_generate on PROMPTS. Any difference fails; the report gives
    mlx-lm's top-2 log-prob margin there (a tiny margin in bf16 or quantized models points at rounding)."""
    start = time.perf_counter()
    target, tokenizer, drafter = load(model, draft, config=config)
    runs = []
    for prompt in PROMPTS:
        tokens = encode_prompt(tokenizer, prompt)
        responses = list(mlx_lm.stream_generate(target, tokenizer, prompt=tokens, max_tokens=max_tokens))
        expected = [r.token for r in responses if r.finish_reason in (None, "length")]
        # Fixed full trees: the most engine per token, and no first-use calibration to wait for.
        ours = generate_ddtree_once(target_model=target, draft_model=drafter, tokenizer=tokenizer,
                                    prompt_tokens=tokens, max_new_tokens=max_tokens,
                                    config=config.replace(tree_budget=SELF_TEST_BUDGET))
        got = [t for t in ours["generated_token_ids"] if t not in tokenizer.eos_token_ids][: len(expected)]
        run = {"prompt": prompt, "tokens": len(expected), "identical": got == expected,
               "tokens_per_cycle": round(ours["avg_acceptance"], 2), "kernels": ours["kernels"]}
        if got != expected:
            at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
            run["first_difference"] = at
            if at < len(responses):
                top2 = np.sort(np.array(responses[at].logprobs.astype(mx.float32)))[-2:]
                run["mlx_lm_top2_margin"] = float(top2[1] - top2[0])
        runs.append(run)
    return {"model": model or "embedded SmolLM2-135M-Instruct", "drafter": type(drafter).__name__,
            "runs": runs, "seconds": round(time.perf_counter() - start, 1), "ok": all(r["identical"] for r in runs),
            "calibration": calibration_report(target, config)}


def calibration_report(target_model: Any, config: DDTreeConfig) -> dict[str, Any] | None:
    """The verify cost curve measured for this model on this machine, if it has been (the doctor does not
    measure)."""
    costs = read(curve_path(adapter_for(target_model), config))
    return None if costs is None else {"sizes": costs.sizes, "seconds": costs.seconds}


def report(model: str | None, draft: str | None, config: DDTreeConfig) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": {"system": platform.system(), "release": platform.release(), "machine": platform.machine(),
                     "chip": chip(), "memory_gib": memory_gib(), "python": platform.python_version()},
        "versions": versions(),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas": blas_name(),
    }
    for name, test in (("self_test", lambda: self_test(model, draft, config)),
                       ("hybrid_self_test", lambda: hybrid_self_test(config))):
        try:
            info[name] = test()
        except Exception as error:  # noqa: BLE001 - the report names whatever broke instead of a traceback alone
            info[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    info["kernels"] = kernel_report(config)  # after the self-tests: the variants they built are listed too
    info["ok"] = info["kernels"]["ok"] and info["self_test"]["ok"] and info["hybrid_self_test"]["ok"]
    return info


def print_report(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    plat = info["platform"]
    print(f"platform   {plat['system']} {plat['release']} {plat['machine']}, {plat['chip']}, "
          f"{plat['memory_gib']} GiB, Python {plat['python']}")
    print("versions   " + ", ".join(f"{name} {version}" for name, version in info["versions"].items()))
    print(f"device     {info['device']} (Metal {'available' if info['metal'] else 'not available'})")
    print(f"BLAS       {info['blas']}")
    kernel = info["kernels"]
    print(f"kernels    {kernel['path']}" + (f": {kernel['reason']}" if "reason" in kernel else ""))
    for variant in kernel["variants"]:
        print(f"  {'ok  ' if variant['ok'] else 'FAIL'} {variant['variant']}: {variant['detail']}")
    print_hybrid(info["hybrid_self_test"])
    test = info["self_test"]
    if "error" in test:
        print(f"self-test  FAIL: {test['error']}")
    else:
        print(f"self-test  {test['model']} with {test['drafter']}, against mlx-lm stream_generate "
              f"({test['seconds']} s)")
        calibration = test.get("calibration")
        print("verify     " + (f"measured: {[round(s * 1000, 1) for s in calibration['seconds']]} ms at tree sizes "
                               f"{list(calibration['sizes'])}" if calibration else
                               "cost per tree size not measured yet for this model here (the first generation does)"))
        for run in test["runs"]:
            detail = ("identical" if run["identical"] else
                      f"DIFFERS at token {run['first_difference']} (mlx-lm top-2 margin "
                      f"{run.get('mlx_lm_top2_margin', float('nan')):.3g})")
            print(f"  {'ok  ' if run['identical'] else 'FAIL'} {run['tokens']} tokens, {detail}, "
                  f"{run['tokens_per_cycle']} tokens/cycle, kernels {run['kernels']}")
    print("all checks passed" if info["ok"] else "some checks FAILED (attach `ddtree-mlx doctor --json` to a report)")


def print_hybrid(test: dict[str, Any]) -> None:
    if "error" in test:
        print(f"hybrid     FAIL: {test['error']}")
        return
    for run in test["runs"]:
        detail = ("identical" if run["identical"] else f"differs at token {run['first_difference']} (mlx-lm top-2 "
                  f"margin {run['mlx_lm_top2_margin']:.3g}{', a near-tie' if run['ok'] else ''})")
        print(f"hybrid     {'ok  ' if run['ok'] else 'FAIL'} {run['dtype']}: {run['tokens']} tokens, {detail}, "
              f"{run['tokens_per_cycle']} tokens/cycle, kernels {run['kernels']}")


def run_doctor(model: str | None, draft: str | None, as_json: bool, config: DDTreeConfig) -> int:
    info = report(model, draft, config)
    print_report(info, as_json)
    sys.stdout.flush()
    return 0 if info["ok"] else 1
