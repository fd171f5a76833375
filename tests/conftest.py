import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Tests pass every setting explicitly; a developer's DDTREE_* environment must not change what they check.
for name in [n for n in os.environ if n.startswith("DDTREE_") and n != "DDTREE_CACHE_DIR"]:
    del os.environ[name]

# One converted embedded model per checkout, reused across test runs (a developer's own cache dir wins).
os.environ.setdefault("DDTREE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "ddtree"))


def pytest_terminal_summary(terminalreporter):
    """How often a bf16 / quantized run left mlx-lm's tokens at a near-tie (the lossless standard's one allowance)."""
    from tiny import COMPARED, NEAR_TIE

    if not COMPARED:
        return
    ties = [(label, index, margin) for label, index, margin in COMPARED if index is not None]
    terminalreporter.write_line(f"lossless: {len(COMPARED)} generations compared with mlx-lm's own greedy decoding, "
                                f"{len(ties)} left it at a near-tie (top-2 margin < {NEAR_TIE})")
    for label, index, margin in ties:
        terminalreporter.write_line(f"  {label}: token {index}, margin {margin:.5f}")


@pytest.fixture(autouse=True)
def fixed_verify_costs(request, monkeypatch):
    """DDTREE_TREE_BUDGET=auto (the default) sizes trees from verify costs measured per machine (ddtree_mlx.calibration);
    tests that leave it automatic get a fixed curve (a node costs 6% of a one-token verify, as measured on these
    CPUs with OpenBLAS), so no test waits for a measurement. tests/test_calibration.py tests the measurement."""
    if request.module.__name__ != "test_calibration":
        from ddtree_mlx.engine import calibration

        fixed = calibration.VerifyCosts((1, 2), (0.01, 0.0106))
        monkeypatch.setattr(calibration, "verify_costs", lambda target, config=None: fixed)


@pytest.fixture(autouse=True)
def fresh_acceptance(monkeypatch):
    """What drafts were worth is remembered across generations in a process (generate.LEARNED): each test starts
    without another test's lessons."""
    from ddtree_mlx.engine import generate

    monkeypatch.setattr(generate, "LEARNED", {})
