"""The wheel carries what the package reads at run time (code, the Metal kernel bodies, the embedded model's
drafter) and nothing else: no benchmark prompt sets, no drafter experiments, no tests."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_holds_code_kernels_and_the_shipped_drafter_only(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    names = [n for n in zipfile.ZipFile(next(tmp_path.glob("ddtree_mlx-*.whl"))).namelist()
             if not n.startswith("ddtree_mlx-")]  # the .dist-info folder
    for kernel in (ROOT / "ddtree_mlx" / "kernels").glob("*.metal"):
        assert f"ddtree_mlx/kernels/{kernel.name}" in names
    for part in ("config.json", "model.safetensors", "draft_vocab.json"):  # the embedded model's drafter
        assert f"ddtree_mlx/smollm2_drafter/{part}" in names
    assert "ddtree_mlx/models/qwen3_5.py" in names and "ddtree_mlx/cli/main.py" in names
    data = [n for n in names if not n.endswith((".py", ".metal")) and "/smollm2_drafter/" not in n]
    assert data == [], f"the wheel should hold code, kernels and the shipped drafter only, not {data}"
