"""The wheel carries what the package reads at run time: the Metal kernel bodies, the prompt sets and the
embedded model's drafter."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_ships_kernels_prompts_and_the_drafter(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                   check=True, capture_output=True)
    names = zipfile.ZipFile(next(tmp_path.glob("ddtree_mlx-*.whl"))).namelist()
    for kernel in (ROOT / "kernels").glob("*.metal"):
        assert f"ddtree_mlx/kernel_sources/{kernel.name}" in names
    for prompts in (ROOT / "ddtree_mlx" / "prompts").glob("*.jsonl"):
        assert f"ddtree_mlx/prompts/{prompts.name}" in names
    assert "ddtree_mlx/models/qwen3_5.py" in names
    for part in ("config.json", "model.safetensors"):  # the embedded model's drafter
        assert f"ddtree_mlx/smollm2_drafter/{part}" in names
