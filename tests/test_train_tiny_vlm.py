"""``tools/train_tiny_vlm.py``: a seeded run is byte-for-byte reproducible, plants its outlier columns, refuses
to overwrite, and a stage-2 run keeps the previous stage's summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--seed", "1", "--threads", "1", "--eval-every", "0", "--steps", "4", "--vision-steps", "2",
         "--n-train-images", "60", "--n-test-images", "12", "--log-every", "2"]


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "tools/train_tiny_vlm.py", "--out", str(out), *SHORT, *extra],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    for name in ("a", "b"):
        run = train(root / name, "--outlier-scale", "16", "--outlier-channels", "2")
        assert run.returncode == 0, run.stderr[-3000:]
    return root


def test_seeded_training_is_reproducible(two_runs):
    a, b = (two_runs / n / "model.safetensors" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


def test_outlier_columns_are_planted_and_recorded(two_runs):
    from safetensors.torch import load_file

    summary = json.loads((two_runs / "a" / "training_summary.json").read_text())
    planted = summary["outlier_columns"]
    assert len(planted) == 18 and all(len(ch) == 2 for ch in planted.values())  # 3 x 4 language + 2 x 3 vision
    w = load_file(str(two_runs / "a" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]  # the Qwen2-VL checkpoint key
    cols = w.float().abs().amax(0)
    ch = planted["language.0.attn_in"]
    others = [c for c in range(w.shape[1]) if c not in ch]
    assert cols[ch].min() > 4 * cols[others].median()  # x16 columns stand out


def test_refuses_an_existing_folder_and_nests_the_previous_stage(two_runs, tmp_path):
    run = train(two_runs / "a")
    assert run.returncode != 0 and "exists; pass --overwrite" in run.stderr
    run = train(tmp_path / "stage2", "--init-from", str(two_runs / "a"))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "stage2" / "training_summary.json").read_text())
    assert summary["outlier_columns"] == {} and "outlier_columns" in summary["previous_stage"]
