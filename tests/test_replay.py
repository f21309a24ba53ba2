"""Every algorithm's record replays through the command line: a second job with ``load_scales`` /
``load_state`` and no calibration data writes exactly the first job's fake-quant weights."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmc.algorithms.records import AWQRecord, GPTQRecord, SmoothQuantRecord
from llmc.cli import main

CASES = {
    "SmoothQuant": ({"method": "SmoothQuant", "act": {"bit": 8}, "special": {"alpha": 0.7},
                     "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"}},
                    "smoothquant_records.pt", "load_scales", SmoothQuantRecord),
    "GPTQ": ({"method": "GPTQ", "special": {"actorder": True}, "weight": {"bit": 3, "group_size": 32}},
             "gptq_records.pt", "load_state", GPTQRecord),
    "AWQ": ({"method": "AWQ", "special": {"n_grid": 4, "clip_grid": 4}, "weight": {"bit": 3, "group_size": 32}},
            "awq_records.pt", "load_scales", AWQRecord),
}


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: the CLI job adds log sinks


@pytest.mark.parametrize("method", sorted(CASES))
def test_record_replays_through_the_cli(tmp_path, tiny_model, calib_dir, method):
    quant, record_file, key, record_type = CASES[method]
    job = {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 4, "bs": 2, "seq_len": 256},
           "quant": {**quant, "quant_objects": ["vision", "language"]},
           "save": {"save_path": "first", "save_fake": True}}
    (tmp_path / "first.yml").write_text(yaml.safe_dump(job))
    assert main([str(tmp_path / "first.yml")]) == 0
    record = record_type.load(tmp_path / "first" / record_file)
    assert not record.is_empty()
    replay = {**job, "save": {"save_path": "second", "save_fake": True}}
    replay.pop("calib")  # replaying needs no calibration data
    replay["quant"] = {**job["quant"], "special": {**quant.get("special", {}), key: f"first/{record_file}"}}
    (tmp_path / "second.yml").write_text(yaml.safe_dump(replay))
    assert main([str(tmp_path / "second.yml")]) == 0
    first = load_file(tmp_path / "first" / "fake" / "model.safetensors")
    second = load_file(tmp_path / "second" / "fake" / "model.safetensors")
    assert first.keys() == second.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert changed == []
    assert f"{method}: saved" not in (tmp_path / "second" / "llmc.log").read_text()  # replays write no record


def test_a_record_of_another_algorithm_is_refused(tmp_path):
    path = GPTQRecord(layers={"x": {"codes": torch.zeros(1, 1, dtype=torch.int8)}}).save(tmp_path)
    with pytest.raises(ValueError, match="is not an llmc AWQ record .*method 'GPTQ'"):
        AWQRecord.load(path)


def test_an_awq_record_written_before_the_schema_still_loads(tmp_path):
    torch.save({"scales": {"b.0.g": torch.ones(4)}, "clips": {}}, tmp_path / "old.pt")
    assert torch.equal(AWQRecord.load(tmp_path / "old.pt").scales["b.0.g"], torch.ones(4))
