import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Tests pass every setting explicitly; a developer's DDTREE_* environment must not change what they check.
for name in [n for n in os.environ if n.startswith("DDTREE_") and n != "DDTREE_CACHE_DIR"]:
    del os.environ[name]
# Full-budget trees unless a test asks for cost-aware pruning, so the trees the tests build are the ones they mean.
os.environ["DDTREE_NODE_COST"] = "0"

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
def fixed_node_cost(request, monkeypatch):
    """The automatic node cost is measured per machine (ddtree_mlx.calibration); tests that leave it automatic get
    a fixed one (0.06, what it measured on these CPUs with OpenBLAS), so their trees do not depend on the machine.
    tests/test_calibration.py tests the measurement itself."""
    if request.module.__name__ != "test_calibration":
        from ddtree_mlx import calibration

        fixed = calibration.VerifyCosts((1, 2), (1.0, 1.06))
        monkeypatch.setattr(calibration, "verify_costs", lambda target, config=None: fixed)
