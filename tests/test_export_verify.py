"""An export that does not compute what the fake-quant model computes fails the job, naming the layers."""
from __future__ import annotations

import pytest
import yaml

import llmc.export.awq_gemm as awq_gemm
import llmc.export.compressed as compressed
from llmc.cli import main
from llmc.export.atomic import read_marker

pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: the CLI job adds log sinks


def job(tmp_path, tiny_model, calib_dir, stream: bool, **save) -> str:
    cfg = {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2, "seq_len": 256},
           "quant": {"method": "RTN", "quant_objects": ["vision", "language"],
                     "weight": {"bit": 4, "symmetric": False, "group_size": 32}},
           "save": {"save_path": str(tmp_path / "out"), "save_fake": True, **save}, "run": {"stream": stream}}
    (tmp_path / "job.yml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "job.yml")


@pytest.mark.parametrize("stream", [False, True])
def test_a_packing_bug_is_caught_while_writing(tmp_path, tiny_model, calib_dir, monkeypatch, capsys, stream):
    real = awq_gemm.awq_layer_tensors

    def swapped_nibbles(m, dtype):
        out = real(m, dtype)
        if m.layer.name.endswith("layers.1.mlp.up_proj"):
            out["qweight"] = awq_gemm.pack_awq(awq_gemm.unpack_awq(out["qweight"]).flip(-1))
        return out
    monkeypatch.setattr(awq_gemm, "awq_layer_tensors", swapped_nibbles)
    assert main([job(tmp_path, tiny_model, calib_dir, stream, save_autoawq=True)]) == 1
    err = capsys.readouterr().err
    assert "autoawq: 1 layer(s) do not read back as their fake-quant weights" in err
    assert "model.language_model.layers.1.mlp.up_proj" in err
    assert not (tmp_path / "out" / "autoawq").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_a_wrong_compressed_export_fails_after_reloading(tmp_path, tiny_model, calib_dir, monkeypatch, capsys, stream):
    real = compressed.compress_layer

    def doubled_scale(m, scheme, scale_dtype):
        out = real(m, scheme, scale_dtype)
        if m.layer.name.endswith("layers.0.self_attn.q_proj"):
            out["weight_scale"] = out["weight_scale"] * 2
        return out
    monkeypatch.setattr(compressed, "compress_layer", doubled_scale)
    assert main([job(tmp_path, tiny_model, calib_dir, stream, save_vllm=True)]) == 1
    err = capsys.readouterr().err
    assert "step 'verify vllm/' failed" in err and "vllm: reloaded by transformers its logits differ" in err
    assert "model.language_model.layers.0.self_attn.q_proj" in err
    out = tmp_path / "out"
    assert (out / "vllm.rejected").is_dir() and not (out / "vllm").exists()  # never left to be served
    assert read_marker(out)["outputs"] == ["fake"]


def test_correct_exports_pass_the_reload(tmp_path, tiny_model, calib_dir):
    assert main([job(tmp_path, tiny_model, calib_dir, False, save_vllm=True, save_autoawq=True, save_gptq=True)]) == 0
    assert "vllm/ reloaded by transformers: logits within 0" in (tmp_path / "out" / "llmc.log").read_text()


def test_packed_vision_warns_about_gptqmodel(tmp_path, tiny_model, calib_dir):
    """``save.pack_vision``: GPTQModel 7.7 outputs NaN with packed vision towers (docs/runtimes.md); the log says so."""
    assert main([job(tmp_path, tiny_model, calib_dir, True, save_autoawq=True, pack_vision=True)]) == 0
    log = (tmp_path / "out" / "llmc.log").read_text()
    assert "save_autoawq: save.pack_vision packs the vision tower; vLLM serves it, GPTQModel 7.7 ignores" in log
