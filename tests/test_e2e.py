"""The job end to end: CLI on a tiny Qwen2-VL, saved folders reload and match the in-memory model."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForImageTextToText

from llmc.calib import load_samples
from llmc.config import parse_config
from llmc.models import load_adapter
from llmc.quant.fake_linear import FakeQuantLinear, set_fake_quant
from llmc.runner import quantize_model

ROOT = Path(__file__).resolve().parent.parent


def rtn_config(model: Path, calib: Path, save: Path, **quant) -> dict:
    return {
        "model": {"type": "qwen2_vl", "path": str(model), "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": str(calib), "n_samples": 4, "bs": 2, "seq_len": 256},
        "quant": {"method": "RTN", "quant_objects": ["vision", "language"],
                  "weight": {"bit": 4, "group_size": 32}, **quant},
        "save": {"save_path": str(save), "save_fake": True, "save_trans": True},
    }


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def test_cli_job_saves_reloadable_folders(tmp_path, tiny_model, calib_dir):
    model_dir = tiny_model("qwen2_vl")
    before = {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    cfg = tmp_path / "job.yml"
    cfg.write_text(yaml.safe_dump(rtn_config(model_dir, calib_dir, Path("out"))))  # relative to the config
    run = subprocess.run([sys.executable, str(ROOT / "tpu" / "llm_quant.py"), "--config_path", str(cfg)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("llmc.log", "config.yml", "quant_layers.json", "fake/config.json", "trans/model.safetensors",
                 "fake/processor_config.json", "fake/chat_template.jinja"):
        assert (out / name).exists(), name
    assert "quantized 22 linear layers" in (out / "llmc.log").read_text()
    # the model's folder is never written to
    assert {p: p.read_bytes() for p in model_dir.rglob("*") if p.is_file()} == before
    # an existing save_path is refused, and left alone
    again = subprocess.run([sys.executable, "-m", "llmc", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr


def test_fake_folder_logits_equal_in_memory_fake_quant(tmp_path, tiny_model, calib_dir):
    cfg = parse_config(rtn_config(tiny_model("qwen2_vl"), calib_dir, tmp_path / "run"))
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=256)
    float_logits = logits_of(adapter.model, batch)
    layers = quantize_model(cfg, adapter, torch.device("cpu"))
    assert len(layers) == 22 and all(v == "w4ag32" for v in layers.values())
    fq_logits = logits_of(adapter.model, batch)
    assert not torch.allclose(fq_logits, float_logits, atol=1e-4)  # quantization did something

    from llmc.export.hf import save_hf_folder
    save_hf_folder(adapter, tmp_path / "fake", fake=True)
    save_hf_folder(adapter, tmp_path / "trans", fake=False)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "fake", dtype=torch.float32)
    assert not any(isinstance(m, FakeQuantLinear) for m in reloaded.modules())
    torch.testing.assert_close(logits_of(reloaded, batch), fq_logits, atol=1e-5, rtol=1e-5)
    # the transformed (RTN: untouched) float weights equal the float model
    trans = AutoModelForImageTextToText.from_pretrained(tmp_path / "trans", dtype=torch.float32)
    torch.testing.assert_close(logits_of(trans, batch), float_logits, atol=1e-5, rtol=1e-5)
    set_fake_quant(adapter.model, False)
    torch.testing.assert_close(logits_of(adapter.model, batch), float_logits, atol=1e-5, rtol=1e-5)
    out = reloaded.generate(**adapter.batch_process(load_samples("custom_mm", calib_dir, 1), with_answer=False),
                            max_new_tokens=2, do_sample=False)
    assert out.shape[0] == 1


def test_quantized_weights_are_on_the_grid(tmp_path, tiny_model, calib_dir):
    cfg = parse_config(rtn_config(tiny_model("qwen2_vl"), calib_dir, tmp_path / "run"))
    adapter = load_adapter("qwen2_vl", cfg.model.path, dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    n = 0
    for m in adapter.model.modules():
        if isinstance(m, FakeQuantLinear):
            groups = m.quantized_weight().reshape(m.out_features, -1, 32)
            assert max(g.unique().numel() for row in groups for g in row) <= 16
            n += 1
    assert n == 22


@pytest.mark.parametrize("family,mtype", [("llava_clip_llama", "llava"), ("qwen2", "qwen2")])
def test_other_families_run(tmp_path, tiny_model, calib_dir, family, mtype):
    cfg = rtn_config(tiny_model(family), calib_dir, tmp_path / "run")
    cfg["model"]["type"] = mtype
    if mtype == "qwen2":
        cfg["quant"]["quant_objects"] = ["language"]
        cfg["calib"] = None
    adapter = load_adapter(mtype, cfg["model"]["path"], dtype="float32")
    layers = quantize_model(parse_config(cfg), adapter, torch.device("cpu"))
    # 2 language blocks x 7 linears, plus 2 CLIP layers x 6 linears for LLaVA
    assert len(layers) == {"llava": 26, "qwen2": 14}[mtype]


def test_cli_writes_every_real_quant_format(tmp_path, tiny_model, calib_dir):
    from llmc.export.compressed import load_real_quant

    cfg = rtn_config(tiny_model("qwen2_vl"), calib_dir, tmp_path / "out")
    cfg["save"].update(save_vllm=True, save_sgl=True, save_autoawq=True, save_gptq=True, tpu_check=True)
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "llmc", str(f)], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    for folder in ("vllm", "sgl", "autoawq", "gptq", "trans", "fake"):
        assert (out / folder / "config.json").is_file(), folder
    assert (out / "trans" / "llmc_quant_layers.json").is_file()
    fake = AutoModelForImageTextToText.from_pretrained(out / "fake", dtype=torch.float32)
    real = load_real_quant(out / "vllm", dtype=torch.float32)
    adapter = load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")
    batch = adapter.batch_process(load_samples("custom_mm", calib_dir, 2), max_length=256)
    torch.testing.assert_close(logits_of(real, batch), logits_of(fake, batch), atol=1e-4, rtol=1e-4)
    # the packed AutoAWQ and GPTQ tensors, unpacked by hand, are the fake-quant weights (fp16 scales)
    from safetensors.torch import load_file
    from test_export_helpers import ckpt_name

    from llmc.export.awq_gemm import awq_dequantize
    from llmc.export.packing import unpack_int32

    want = load_file(out / "fake" / "model.safetensors")  # checkpoint names (save_pretrained's)
    awq, gptq = load_file(out / "autoawq" / "model.safetensors"), load_file(out / "gptq" / "model.safetensors")
    layers = {n: m for n, m in adapter.model.named_modules() if n.startswith("model.") and
              isinstance(m, torch.nn.Linear) and (".language_model." in n or ".visual." in n)}
    packed = [k.removesuffix(".qweight") for k in awq if k.endswith(".qweight")]
    assert len(packed) == 14 and all(".language_model.layers." in n for n in packed)  # in-memory names; vision float
    for name in layers:
        w = want[ckpt_name("qwen2_vl", name) + ".weight"].float()
        if f"{name}.qweight" not in awq:  # the vision tower: fake-quant float weights in both formats
            assert ".visual." in name and torch.equal(awq[f"{name}.weight"].float(), w.half().float())
            assert torch.equal(gptq[f"{name}.weight"].float(), w.half().float())
            continue
        got = awq_dequantize(awq[f"{name}.qweight"], awq[f"{name}.qzeros"], awq[f"{name}.scales"], 32)
        torch.testing.assert_close(got, w, atol=2e-3 * float(w.abs().max()), rtol=0)
        q = unpack_int32(gptq[f"{name}.qweight"].t().contiguous(), 4).float()  # [out, in]
        z = unpack_int32(gptq[f"{name}.qzeros"], 4).float().t()  # asymmetric: gptq_v2 stores the zero itself
        g = gptq[f"{name}.g_idx"].long()
        s = gptq[f"{name}.scales"].float().t()
        torch.testing.assert_close((q - z[:, g]) * s[:, g], w, atol=2e-3 * float(w.abs().max()), rtol=0)


def test_unexportable_plan_fails_before_quantizing(tmp_path, tiny_model, calib_dir):
    cfg = rtn_config(tiny_model("qwen2_vl"), calib_dir, tmp_path / "out", )
    cfg["quant"]["weight"]["bit"] = 3
    cfg["save"].update(save_trans=True, tpu_check=True)
    f = tmp_path / "job.yml"
    f.write_text(yaml.safe_dump(cfg))
    run = subprocess.run([sys.executable, "-m", "llmc", str(f)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "tpu" in run.stderr.lower()
    assert not (tmp_path / "out").exists()
    log = (tmp_path / "out.failed.log").read_text()
    assert "step 'plan' failed" in log and "RTN on language" not in log  # refused before quantizing


def test_readme_main_job(tmp_path):
    """The README's main command, on the embedded default, with the save path moved to a temp folder."""
    cfg = yaml.safe_load((ROOT / "configs" / "default.yml").read_text())
    cfg["save"]["save_path"] = str(tmp_path / "default")
    f = ROOT / "configs" / f".test-default-{tmp_path.name}.yml"  # next to default.yml: same relative paths
    try:
        f.write_text(yaml.safe_dump(cfg))
        run = subprocess.run([sys.executable, str(ROOT / "tpu" / "llm_quant.py"), "--config_path", str(f)],
                             capture_output=True, text=True, cwd=ROOT, timeout=900)
    finally:
        f.unlink(missing_ok=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| mme_synth/existence |" in run.stdout + run.stderr
    report = (tmp_path / "default" / "eval" / "report.md").read_text()
    assert "fake_quant" in report and (tmp_path / "default" / "awq_records.pt").is_file()
