import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
OPENBLAS = os.environ.get("DDTREE_OPENBLAS", "1")  # read before the scrub below (see pytest_configure)
# Tests pass every setting explicitly; a developer's DDTREE_* environment must not change what they check.
for name in [n for n in os.environ if n.startswith("DDTREE_") and n != "DDTREE_CACHE_DIR"]:
    del os.environ[name]

# One converted embedded model per checkout, reused across test runs (a developer's own cache dir wins).
os.environ.setdefault("DDTREE_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "ddtree"))


def pytest_configure(config):
    """Run on Debian's OpenBLAS where it is installed, as `ddtree-mlx` and benchmark.py do (blas.use_openblas
    re-runs the command with it preloaded, a thread per core): MLX's Linux CPU wheel multiplies on a
    reference BLAS ~25x slower, minutes of the real-model tests. DDTREE_OPENBLAS=0 keeps MLX's own BLAS. Only a
    pytest command line is re-run, never pytest.main() inside another program."""
    import platform

    from ddtree_mlx import blas
    from ddtree_mlx.config import parse_bool

    command = Path(sys.argv[0])
    if (not parse_bool("DDTREE_OPENBLAS", OPENBLAS) or platform.system() != "Linux"
            or "openblas" in os.environ.get("LD_PRELOAD", "").lower() or not Path(blas.OPENBLAS).exists()
            or not (command.name in ("pytest", "py.test") or command.parent.name == "pytest")):
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # the re-run writes to the terminal, not to this run's capture files
    blas.use_openblas(True)


def pytest_report_header(config):
    from ddtree_mlx.blas import blas_name

    return f"BLAS: {blas_name()}"


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


@pytest.fixture
def fresh_kernels(monkeypatch, tmp_path):
    """A process that has built and checked no Metal kernel yet (a new guard, nothing prepared, no compiled kernel
    kept); returns a configuration that keeps kernel verdicts under tmp_path, never in the user's cache."""
    from ddtree_mlx import DDTreeConfig
    from ddtree_mlx.cli import doctor
    from ddtree_mlx.kernels import dispatch, guard, metal

    state = guard.Guard()
    for module in (dispatch, doctor):
        monkeypatch.setattr(module, "GUARD", state)
    monkeypatch.setattr(dispatch, "_PREPARED", set())
    metal._built.cache_clear()
    yield DDTreeConfig(cache_dir=str(tmp_path))
    metal._built.cache_clear()
