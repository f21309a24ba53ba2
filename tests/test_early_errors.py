"""Every mistake is an error before the model loads (or right after, where the model is needed), naming
the bad value and what is valid: exit 2, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmc.cli import main

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: the CLI job adds log sinks


@pytest.fixture
def cfg(tmp_path, tiny_model, calib_dir):
    return {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
            "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2, "seq_len": 256},
            "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
            "save": {"save_path": str(tmp_path / "out")}}


def refused(tmp_path: Path, capsys, cfg: dict, *patterns: str) -> str:
    """Run the job; it must exit 2 with every pattern on stderr and leave nothing behind."""
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([str(f)]) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no save path, temp folder or log
    return err


def test_skip_pattern_matching_no_layer_lists_the_closest(tmp_path, capsys, cfg):
    cfg["quant"]["skip_layers"] = ["*.mlp.dwn_proj"]
    refused(tmp_path, capsys, cfg, "quant.skip_layers: '*.mlp.dwn_proj' matches no module", "'*.mlp.down_proj'")


def test_override_pattern_matching_no_layer(tmp_path, capsys, cfg):
    cfg["quant"]["overrides"] = [{"pattern": "model.language_model.layer.0.*", "weight": {"bit": 8}}]
    refused(tmp_path, capsys, cfg, "quant.overrides[0].pattern", "matches no module",
            "model.language_model.layers.*.")


def test_unknown_calibration_dataset(tmp_path, capsys, cfg):
    cfg["calib"]["name"] = "coco"
    refused(tmp_path, capsys, cfg, "calib.name: 'coco' is not a calibration dataset", "['custom_mm', 'custom_txt']")


@pytest.mark.parametrize("n", [0, -3])
def test_n_samples_must_be_positive(tmp_path, capsys, cfg, n):
    cfg["calib"]["n_samples"] = n
    refused(tmp_path, capsys, cfg, f"calib.n_samples: {n} is not valid", "null for every sample")


def test_unknown_eval_task_before_the_model_loads(tmp_path, capsys, cfg):
    cfg["eval"] = {"eval_pos": ["fake_quant"], "name": ["mme_synth", "no_such_task"], "fidelity_samples": 0}
    err = refused(tmp_path, capsys, cfg, "eval.name: unknown task(s) 'no_such_task'", "['mme', 'mme_synth']")
    assert "llmc: model" not in err  # refused before loading


def test_model_type_that_does_not_match_the_checkpoint(tmp_path, capsys, cfg, tiny_model):
    cfg["model"]["path"] = str(tiny_model("llava_clip_llama"))
    refused(tmp_path, capsys, cfg, "model.type: 'qwen2_vl' does not match", "model_type 'llava'",
            "use model.type: llava")


def test_folder_without_config_json(tmp_path, capsys, cfg):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    cfg["model"]["path"] = str(empty)
    refused(tmp_path, capsys, cfg, "has no config.json")


def test_truncated_safetensors_names_the_file(tmp_path, capsys, cfg):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(cfg["model"]["path"], model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    cfg["model"]["path"] = str(model)
    refused(tmp_path, capsys, cfg, f"{weights}: truncated safetensors file")


def test_index_with_a_missing_shard(tmp_path, capsys, cfg):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(cfg["model"]["path"], model)
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    cfg["model"]["path"] = str(model)
    refused(tmp_path, capsys, cfg, "names shard(s) that are not in the folder", "model-00002-of-00002.safetensors")


def test_config_path_that_is_a_directory(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "is a directory; give the YAML file" in capsys.readouterr().err


def test_inspect_on_a_missing_folder_is_no_hub_id(tmp_path, capsys):
    assert main(["inspect", "Qwen/Qwen2-VL-2B-Instruct"]) == 2
    assert "does not exist (a local checkpoint folder is expected; nothing is downloaded)" in capsys.readouterr().err


def test_help_lists_every_subcommand():
    run = subprocess.run([sys.executable, "-m", "llmc", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0
    for sub in ("run", "inspect", "doctor"):
        assert f"\n  {sub} " in run.stdout and f"llmc {sub}" in run.stdout.replace("[run]", "run")


def test_torch_dtype_is_read_as_dtype_with_a_note(tmp_path, cfg):
    cfg["model"]["torch_dtype"] = cfg["model"].pop("dtype")
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    assert main([str(f)]) == 0
    assert "model.torch_dtype read as model.dtype (ModelTC llmc spelling)" in (tmp_path / "out" / "llmc.log").read_text()
    assert yaml.safe_load((tmp_path / "out" / "config.yml").read_text())["model"]["dtype"] == "float32"


def test_torch_dtype_and_dtype_together_are_refused(tmp_path, capsys, cfg):
    cfg["model"]["torch_dtype"] = "bfloat16"
    refused(tmp_path, capsys, cfg, "give 'dtype' or its alias 'torch_dtype', not both")


def test_error_after_the_model_loaded_is_one_line_and_the_traceback_goes_to_the_log(tmp_path, cfg):
    cfg["quant"]["method"] = "GPTQ"
    cfg["calib"]["seq_len"] = 8  # cuts the image tokens: found while calibrating, after the model loaded
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "llmc", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "seq_len=8 would cut its image tokens" in run.stderr
    assert "Traceback" not in run.stderr
    assert "Traceback" in (tmp_path / "out.failed.log").read_text()
    debug = subprocess.run([sys.executable, "-m", "llmc", str(f), "--debug"], capture_output=True, text=True, cwd=ROOT)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_dtype_the_device_cannot_run_is_refused():
    import torch

    from llmc.pipeline import check_dtype

    check_dtype(torch.device("cpu"), "bfloat16")  # the CPU computes bf16
    check_dtype(torch.device("cuda"), "bfloat16", bf16_supported=True)
    with pytest.raises(ValueError, match="model.dtype: 'bfloat16' cannot run on .*valid here: 'float16', 'float32'"):
        check_dtype(torch.device("cuda"), "bfloat16", bf16_supported=False)
