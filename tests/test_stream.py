"""Streamed checkpoints: the meta model gets exactly the checkpoint's tensors, scope by scope; a streamed job
writes the same tensors as the eager one; what cannot stream says why."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llmc.cli import main
from llmc.models import load_adapter
from llmc.testing import vlm_families

FAMILIES = {**vlm_families(), "qwen2": "qwen2", "llama": "llama"}


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: the CLI job adds log sinks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_model_holds_the_checkpoint(tiny_model, family):
    path = str(tiny_model(family))
    eager = load_adapter(FAMILIES[family], path, dtype="float32")
    streamed = load_adapter(FAMILIES[family], path, dtype="float32", stream=True)
    assert streamed.stream is not None
    blocks = streamed.blocks("language")
    assert all(p.is_meta for p in blocks.parameters())  # only the language blocks wait on disk
    assert not any(p.is_meta for n, p in streamed.model.named_parameters()
                   if not n.startswith(streamed.model_parts.language_blocks + "."))
    for i in range(len(blocks)):
        streamed.stream.load(f"{streamed.model_parts.language_blocks}.{i}")
    want, got = eager.model.state_dict(), streamed.model.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    streamed.stream.release(blocks[0])
    assert all(p.is_meta for p in blocks[0].parameters())


def test_a_tensor_missing_from_the_checkpoint_is_named(tiny_model, tmp_path):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "cut"
    shutil.copytree(tiny_model("qwen2"), folder)
    sd = load_file(folder / "model.safetensors")
    name = next(k for k in sd if k.endswith("layers.1.mlp.down_proj.weight"))
    sd.pop(name)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has no tensor for 1 parameter.*layers.1.mlp.down_proj.weight"):
        load_adapter("qwen2", str(folder), dtype="float32", stream=True)


def _job(tmp_path, tiny_model, calib_dir, name: str, stream, method: str, **save) -> dict:
    return {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
            "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 4, "bs": 2, "seq_len": 256},
            "quant": {"method": method, "quant_objects": ["vision", "language"],
                      "weight": {"bit": 4, "symmetric": method == "GPTQ", "group_size": 32},
                      "special": {"n_grid": 4, "clip_grid": 4} if method == "AWQ" else {}},
            "save": {"save_path": str(tmp_path / name), **save}, "run": {"stream": stream}}


@pytest.mark.parametrize("method, formats", [("AWQ", ("fake", "vllm", "autoawq", "trans")),
                                             ("GPTQ", ("fake", "vllm", "gptq"))])
def test_streamed_job_writes_the_tensors_of_the_eager_job(tmp_path, tiny_model, calib_dir, method, formats):
    keys = {"fake": "save_fake", "vllm": "save_vllm", "autoawq": "save_autoawq", "gptq": "save_gptq",
            "trans": "save_trans"}
    for name, stream in (("eager", False), ("streamed", True)):
        job = _job(tmp_path, tiny_model, calib_dir, name, stream, method, **{keys[f]: True for f in formats})
        (tmp_path / f"{name}.yml").write_text(yaml.safe_dump(job))
        assert main([str(tmp_path / f"{name}.yml")]) == 0
    assert "language blocks are read one at a time" in (tmp_path / "streamed" / "llmc.log").read_text()
    assert "loaded whole" not in (tmp_path / "streamed" / "llmc.log").read_text()
    for folder in formats:
        a = load_file(tmp_path / "eager" / folder / "model.safetensors")
        b = load_file(tmp_path / "streamed" / folder / "model.safetensors")
        assert a.keys() == b.keys(), folder
        assert [k for k in a if not torch.equal(a[k], b[k])] == [], folder
        ca = json.loads((tmp_path / "eager" / folder / "config.json").read_text())
        cb = json.loads((tmp_path / "streamed" / folder / "config.json").read_text())
        assert ca.get("quantization_config") == cb.get("quantization_config"), folder


def test_what_cannot_stream_says_why(tmp_path, tiny_model, calib_dir, capsys):
    job = _job(tmp_path, tiny_model, calib_dir, "rot", "auto", "RTN", save_fake=True)
    job["quant"]["method"] = ["Rotation", "RTN"]
    (tmp_path / "rot.yml").write_text(yaml.safe_dump(job))
    assert main([str(tmp_path / "rot.yml")]) == 0
    assert "loaded whole (eager path): Rotation transforms every block" in (tmp_path / "rot" / "llmc.log").read_text()
    job["run"]["stream"] = True
    job["save"]["save_path"] = str(tmp_path / "rot2")
    (tmp_path / "rot2.yml").write_text(yaml.safe_dump(job))
    assert main([str(tmp_path / "rot2.yml")]) == 2
    assert "run.stream: true, but Rotation transforms every block" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_activations_offloaded_give_the_same_weights(tmp_path, tiny_model, calib_dir, mode):
    from llmc.config import parse_config
    from llmc.export.hf import export_state_dict
    from llmc.runner import quantize_model

    weights = {}
    for m in ("device", mode):
        job = _job(tmp_path, tiny_model, calib_dir, "x", "auto", "GPTQ")
        job["run"]["offload_activations"] = m
        cfg = parse_config(job)
        adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
        state = tmp_path / m
        state.mkdir()
        quantize_model(cfg, adapter, torch.device("cpu"), state_dir=state)
        weights[m] = export_state_dict(adapter.model, fake=True)
        assert not (state / ".activations").exists()  # the offloaded activations are gone afterwards
    assert [k for k in weights["device"] if not torch.equal(weights["device"][k], weights[mode][k])] == []


def test_auto_offload_measures_and_chooses(tmp_path):
    from llmc.offload import ActivationStore

    small = [torch.zeros(4, 8)]
    assert ActivationStore.choose("auto", small, torch.device("cpu"), tmp_path).mode == "device"
    huge = [torch.zeros(1, 1).expand(2**40, 1)]  # 4 TiB by numel: no memory holds it
    assert ActivationStore.choose("auto", huge, torch.device("cpu"), tmp_path).mode == "disk"


def test_no_state_dir_leaves_no_temp_folder(tmp_path, tiny_model, calib_dir, monkeypatch):
    """Without a state folder the activations live in a temporary one, removed even when the job fails."""
    import tempfile

    from llmc.config import parse_config
    from llmc.runner import quantize_model

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    job = _job(tmp_path, tiny_model, calib_dir, "x", "auto", "GPTQ")
    job["run"]["offload_activations"] = "disk"
    cfg = parse_config(job)
    quantize_model(cfg, load_adapter("qwen2_vl", cfg.model.path, dtype="float32"), torch.device("cpu"))
    assert list(scratch.iterdir()) == []

    def boom(*args, **kwargs):
        raise RuntimeError("block failed")

    monkeypatch.setattr("llmc.runner.process_blocks", boom)
    with pytest.raises(RuntimeError, match="block failed"):
        quantize_model(cfg, load_adapter("qwen2_vl", cfg.model.path, dtype="float32"), torch.device("cpu"))
    assert list(scratch.iterdir()) == []
