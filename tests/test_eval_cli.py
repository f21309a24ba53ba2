"""``--model llmc`` from the command line on a folder saved by llmc; results files are checked, not exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmc.config import parse_config
from llmc.data.mme_synth import generate as make_mme_synth
from llmc.eval import mme_local
from llmc.export.hf import save_hf_folder
from llmc.models import load_adapter
from llmc.runner import quantize_model

ROOT = Path(__file__).resolve().parent.parent


# The shim's main(), after checking that a job's log sink survives importing the evaluation (and so
# lmms-eval, whose import calls logger.remove()); one process for both saves an lmms-eval start-up.
SHIM_KEEPING_LOGURU_SINKS = """
import io
from loguru import logger
buf = io.StringIO()
sink = logger.add(buf)
import llmc.eval.run
logger.info("after import")
logger.remove(sink)  # raises if lmms-eval removed it
assert "after import" in buf.getvalue()
print("sink kept")
from llmc.eval.lmms_cli import main
main()
"""


def saved_fake_quant(model_dir: Path, calib_dir: Path, out: Path) -> Path:
    """RTN W4 fake-quant folder written by llmc's exporter."""
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(model_dir), "dtype": "float32"},
                        "calib": {"name": "custom_mm", "path": str(calib_dir)},
                        "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
                        "save": {"save_path": str(out / "unused")}})
    adapter = load_adapter("qwen2_vl", str(model_dir), dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    return save_hf_folder(adapter, out / "fake", fake=True)


def read_run(out: Path, task: str) -> tuple[dict, list[dict]]:
    results = sorted(out.rglob("*_results.json"))
    samples = sorted(out.rglob(f"*_samples_{task}.jsonl"))
    assert len(results) == 1 and len(samples) == 1, sorted(out.rglob("*"))
    rows = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), rows


def test_plugin_variable_registers_llmc(monkeypatch):
    """What ``LMMS_EVAL_PLUGINS=llmc.eval python -m lmms_eval`` does to resolve ``--model llmc``."""
    import importlib.util

    from llmc.eval.lmms_compat import models
    from llmc.eval.lmms_wrapper import LLMCLMM

    monkeypatch.setenv("LMMS_EVAL_PLUGINS", "llmc.eval")
    with pytest.warns(DeprecationWarning, match="LMMS_EVAL_PLUGINS"):
        registry = models._initialize_model_registry()
    assert registry.get_model_class("llmc") is LLMCLMM
    assert importlib.util.find_spec("llmc.eval.tasks").submodule_search_locations[0]


def entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "llmc" for ep in entry_points(group="lmms_eval.models"))


def test_entry_point_loads_inside_an_llmc_process():
    """lmms-eval loads entry points while ``lmms_eval.models`` is importing; from an llmc job that import
    comes through ``llmc.eval.lmms_compat``: no circular import, ``llmc`` resolvable without register()."""
    if not entry_point_installed():
        pytest.skip("llmc is not pip-installed with its lmms_eval.models entry point")
    code = ("import llmc.eval.lmms_compat as c\n"
            "print(c.models.get_model_manifest('llmc').simple_class_path)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().endswith("llmc.eval.lmms_wrapper.LLMCLMM")
    assert "Failed to load model entry-point" not in run.stdout + run.stderr


def test_lmms_eval_cli_and_shim_on_saved_folder(tmp_path, tiny_model, calib_dir, capsys):
    ckpt = saved_fake_quant(tiny_model("qwen2_vl"), calib_dir, tmp_path)
    data = make_mme_synth(tmp_path / "synth", "test", n_images=6, seed=0)
    assert mme_local.main(["--path", str(data), "--out", str(tmp_path / "task"), "--limit", "8"]) == 0
    assert "--tasks mme_synth" in capsys.readouterr().out
    args = ["--model", "llmc", "--model_args", f"pretrained={ckpt},max_new_tokens=3", "--tasks", "mme_synth",
            "--include_path", str(tmp_path / "task" / "tasks"), "--batch_size", "4", "--log_samples"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(ROOT), HF_DATASETS_CACHE=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    # plain `python -m lmms_eval --model llmc` through the entry point when llmc is pip-installed (CI),
    # else through lmms-eval's plugin variable
    cli_env = env if entry_point_installed() else dict(env, LMMS_EVAL_PLUGINS="llmc.eval")
    runs = {  # all at once: most of the time is imports
        "plugin": subprocess.Popen([sys.executable, "-m", "lmms_eval", *args, "--output_path", str(tmp_path / "o1")],
                                   env=cli_env, cwd=tmp_path,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "shim": subprocess.Popen([sys.executable, "-c", SHIM_KEEPING_LOGURU_SINKS, *args, "--output_path",
                                  str(tmp_path / "o2")], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    }
    logs = {k: p.communicate(timeout=300)[0] for k, p in runs.items()}
    assert "sink kept" in logs["shim"], logs["shim"][-3000:]
    outputs = {}
    for key, out in (("plugin", tmp_path / "o1"), ("shim", tmp_path / "o2")):
        assert out.exists(), logs[key][-3000:]
        results, rows = read_run(out, "mme_synth")
        assert results["config"]["model"] == "llmc" and str(ckpt) in results["config"]["model_args"]
        summary = mme_local.summary_from_logged(rows)
        assert summary["n_questions"] == 8 and len(summary["categories"]) == 4
        assert results["results"]["mme_synth"]["mme_perception_score,none"] == summary["perception"]
        outputs[key] = [r["filtered_resps"] for r in rows]
    assert outputs["plugin"] == outputs["shim"]
