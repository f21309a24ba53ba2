"""Bad configs fail early with a message that names the bad value and what is valid."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmc.config import ConfigError, load_config, parse_config
from llmc.models import load_adapter
from llmc.runner import quantize_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def base(tmp_path, tiny_model):
    return {
        "model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
        "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
        "save": {"save_path": str(tmp_path / "out")},
    }


def test_valid_config_and_relative_paths(tmp_path, base):
    base["save"]["save_path"] = "runs/x"
    f = tmp_path / "sub" / "cfg.yml"
    f.parent.mkdir()
    f.write_text(yaml.safe_dump(base))
    cfg = load_config(f)
    assert cfg.save.save_path == str((f.parent / "runs/x").resolve())  # relative to the config file
    assert cfg.quant.weight.to_spec().describe() == "w4ag32"


@pytest.mark.parametrize("section,key,value,pattern", [
    ("quant", "methd", "RTN", r"unknown key 'methd' \(did you mean 'method'\?\)"),
    ("model", "dtyp", "float32", r"unknown key 'dtyp' \(did you mean 'dtype'\?\)"),
    ("quant", "weight", {"bit": 4, "group_sise": 32}, r"quant\.weight: unknown key 'group_sise' \(did you mean 'group_size'\?\)"),
    ("quant", "weight", {"bit": 5}, r"bit: 5 is not supported; valid: \[2, 3, 4, 8\]"),
    ("quant", "weight", {"granularity": "per_tensor"}, r"'per_tensor' is not valid.*per_channel"),
    ("quant", "quant_objects", ["visoin"], r"'visoin' is not valid \(did you mean 'vision'\?\)"),
    ("quant", "method", "AWQQ", r"'AWQQ' is not supported.*valid: \["),
    ("model", "dtype", "fp8", r"model\.dtype: 'fp8' is not valid; valid: \['auto'"),
    ("calib", "bs", 0, r"calib\.bs: 0 is not valid"),
])
def test_bad_values(base, section, key, value, pattern):
    base.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError, match=pattern):
        parse_config(base)
        from llmc.algorithms import build_algorithms
        build_algorithms(parse_config(base).quant)


def test_unknown_section(base):
    base["quantize"] = {}
    with pytest.raises(ConfigError, match=r"unknown key 'quantize' \(did you mean 'quant'\?\)"):
        parse_config(base)


def test_wrong_model_type_lists_valid(base):
    base["model"]["type"] = "qwen2vl_x"
    cfg = parse_config(base)
    with pytest.raises(ConfigError, match=r"model\.type: 'qwen2vl_x' is not supported.*valid: \[.*'qwen2_vl'"):
        load_adapter(cfg.model.type, cfg.model.path)


def test_missing_paths(base, tmp_path):
    base["model"]["path"] = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model.path: .*nope does not exist"):
        parse_config(base)
    with pytest.raises(ConfigError, match="config file .* does not exist"):
        load_config(tmp_path / "missing.yml")


def test_bad_group_size_names_the_layer(base):
    base["quant"]["weight"]["group_size"] = 48
    cfg = parse_config(base)
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    with pytest.raises(ConfigError, match=r"group_size=48 does not divide in_features=64 of layer "
                                          r"model\.language_model\.layers\.0\.self_attn\.q_proj"):
        quantize_model(cfg, adapter, torch.device("cpu"))


def test_cli_exit_codes(tmp_path, base):
    base["quant"]["methd"] = "RTN"
    f = tmp_path / "bad.yml"
    f.write_text(yaml.safe_dump(base))
    run = subprocess.run([sys.executable, "-m", "llmc", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "did you mean 'method'" in run.stderr
    assert not (tmp_path / "out").exists()


def test_save_path_inside_model_folder_is_refused(base, tmp_path):
    base["save"]["save_path"] = str(Path(base["model"]["path"]) / "quantized")
    from llmc.runner import run_job
    with pytest.raises(ConfigError, match=r"save\.save_path: .*quantized lies inside model\.path .*qwen2_vl"):
        run_job(parse_config(base))


def test_failed_job_leaves_no_partial_folder(base, tmp_path, monkeypatch):
    import llmc.runner as runner

    def boom(*a, **k):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(runner, "quantize_model", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.run_job(parse_config(base))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    assert "simulated crash" in (tmp_path / "out.failed.log").read_text()
