"""Evaluation inside the job: every position side by side in one report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmc.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parent.parent


def job(tiny: Path, calib: Path, test: Path, save: Path) -> dict:
    return {
        "model": {"type": "qwen2_vl", "path": str(tiny), "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": str(calib), "n_samples": 4, "bs": 2, "seq_len": 256},
        "eval": {"eval_pos": ["pretrain", "transformed", "fake_quant", "real_quant"], "name": "mme_synth",
                 "path": str(test), "bs": 4, "max_new_tokens": 2, "limit": 12, "fidelity_samples": 4},
        "quant": {"method": "RTN", "quant_objects": ["vision", "language"], "weight": {"bit": 4, "group_size": 32}},
        "save": {"save_path": str(save), "save_vllm": True},
    }


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    from llmc.data.mme_synth import generate

    return generate(tmp_path_factory.mktemp("mme") / "test", "test", n_images=6, seed=0)


def test_job_reports_every_position(tmp_path, tiny_model, calib_dir, test_split):
    cfg = tmp_path / "job.yml"
    cfg.write_text(yaml.safe_dump(job(tiny_model("qwen2_vl"), calib_dir, test_split, tmp_path / "out")))
    run = subprocess.run([sys.executable, "-m", "llmc", str(cfg)], capture_output=True, text=True, cwd=ROOT,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    ev = tmp_path / "out" / "eval"
    report = json.loads((ev / "report.json").read_text())
    res = report["results"]
    assert list(res) == ["pretrain", "transformed", "fake_quant", "real_quant"] and report["baseline"] == "pretrain"
    scores = {p: res[p]["tasks"]["mme_synth"] for p in res}
    # RTN transforms nothing: the transformed model is the float model, its answers and scores are the same
    assert scores["transformed"]["categories"] == scores["pretrain"]["categories"]
    assert res["transformed"]["fidelity"]["kl"] < 1e-6 and res["transformed"]["fidelity"]["top1_agreement"] == 1.0
    # the export reloaded from disk is the fake-quant model: same answers, same fidelity
    assert scores["real_quant"]["categories"] == scores["fake_quant"]["categories"]
    assert res["real_quant"]["fidelity"]["kl"] == pytest.approx(res["fake_quant"]["fidelity"]["kl"], abs=1e-6)
    assert res["fake_quant"]["fidelity"]["kl"] > 1e-5  # quantization changed the model
    for s in scores.values():  # MME arithmetic: total = perception + cognition, per-category sum
        assert s["total"] == pytest.approx(s["perception"] + s["cognition"])
        assert s["perception"] == pytest.approx(sum(s["categories"].values()))
    md = (ev / "report.md").read_text()
    b, v = scores["pretrain"]["total"], scores["fake_quant"]["total"]
    rec = f"{100 * v / b:.1f}" if b else "n/a"
    assert f"| mme_synth/total | {b:.2f} | {v:.2f} | {v - b:.2f} | {rec} |" in md
    assert (ev / "report.png").stat().st_size > 1000
    assert "evaluation report" in (tmp_path / "out" / "llmc.log").read_text()


def test_eval_config_errors(tmp_path, tiny_model, calib_dir, test_split):
    base = job(tiny_model("qwen2_vl"), calib_dir, test_split, tmp_path / "out")
    base["eval"]["eval_pos"] = ["pretrian"]
    with pytest.raises(ConfigError, match=r"'pretrian' is not valid \(did you mean 'pretrain'\?\)"):
        parse_config(base)
    base = job(tiny_model("qwen2_vl"), calib_dir, test_split, tmp_path / "out")
    base["save"]["save_vllm"] = False
    with pytest.raises(ConfigError, match="real_quant .* set save.save_vllm"):
        parse_config(base)
    base = job(tiny_model("qwen2_vl"), calib_dir, test_split, tmp_path / "out")
    base["eval"].update(name="mme", path=None)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        parse_config(base)
