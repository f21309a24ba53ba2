"""VILA-style model outside transformers: registration vs trust_remote_code, RTN/AWQ through the CLI, rotation."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmc.algorithms import build_algorithms
from llmc.calib import load_samples
from llmc.config import QuantConfig
from llmc.models import load_adapter
from llmc.plan import load_plan
from llmc.testing.tiny_vila import EXAMPLES, FAMILY, IMAGE_TOKENS, vila_package

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "LLMC_CACHE": str(tmp_path / "cache"),
            "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONPATH": str(REPO)}


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """A fresh interpreter that has NOT imported the vila_tiny package (run outside the repo)."""
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def vila_dir(tiny_model) -> Path:
    vila_package()
    return tiny_model(FAMILY)


def test_saved_folder_carries_code_and_auto_map(vila_dir):
    cfg = yaml.safe_load((vila_dir / "config.json").read_text())
    assert cfg["model_type"] == "vila_tiny" and set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForImageTextToText"}
    for name in ("configuration_vila_tiny.py", "modeling_vila_tiny.py"):
        assert (vila_dir / name).read_text() == (EXAMPLES / "vila_tiny" / name).read_text()


def test_loading_needs_registration_or_trust_remote_code(vila_dir, tmp_path):
    code = ("import llmc.models.vila\nfrom llmc.models import load_adapter\n"
            f"a = load_adapter('vila', {str(vila_dir)!r}, dtype='float32', trust_remote_code={{trust}})\n"
            "print('LOADED', type(a.model).__module__, a.model.config.model_type)")
    refused = _python(code.format(trust=False), tmp_path)
    assert refused.returncode != 0
    assert "'vila_tiny' model, which transformers does not know" in refused.stderr
    assert "model.trust_remote_code: true" in refused.stderr and "import vila_tiny" in refused.stderr
    loaded = _python(code.format(trust=True), tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert "LOADED transformers_modules." in loaded.stdout and "vila_tiny" in loaded.stdout
    imported = _python(f"import sys; sys.path.append({str(EXAMPLES)!r}); import vila_tiny\n"
                       + code.format(trust=False), tmp_path)  # registered by the import: no remote code
    assert imported.returncode == 0 and "LOADED vila_tiny.modeling_vila_tiny" in imported.stdout, imported.stderr


def test_image_tokens_and_features(vila_dir, calib_dir):
    adapter = load_adapter("vila", str(vila_dir), dtype="float32")
    sample = load_samples("custom_mm", calib_dir, 1)[0]
    batch = adapter.batch_process([sample])
    assert int(adapter.image_token_mask(batch["input_ids"]).sum()) == IMAGE_TOKENS
    with torch.no_grad():
        ref = adapter.model(**batch).logits
        no_image = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (ref - no_image).abs().max() > 1e-3  # the image features really replace the <image> embeddings


def test_rotation_keeps_logits_with_an_image(vila_dir, calib_dir):
    adapter = load_adapter("vila", str(vila_dir), dtype="float32", attn_implementation="eager")
    samples = load_samples("custom_mm", calib_dir, 2)
    batch = adapter.batch_process(samples)
    assert adapter.image_token_mask(batch["input_ids"]).sum() > 0
    with torch.no_grad():
        for block in adapter.blocks("language"):  # non-trivial norms: folding is exercised
            for name in adapter.block_layout("language", block).norms:
                block.get_submodule(name).weight.mul_(1.5)
        ref = adapter.model(**batch, use_cache=False).logits
    writer = adapter.module("mm_projector.layers.2").weight.detach().clone()
    algo = build_algorithms(QuantConfig(method=["Rotation"], special={}))[0]
    algo.prepare_model(adapter, CPU)
    with torch.no_grad():
        out = adapter.model(**batch, use_cache=False).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-4
    assert not torch.allclose(adapter.module("mm_projector.layers.2").weight, writer)  # the projector was rotated


def _job(method: str, model_dir: Path, calib: Path, out: Path, special: dict | None) -> dict:
    quant = {"method": method, "quant_objects": ["vision", "language"],
             "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}}
    if special:
        quant["special"] = special
    return {"model": {"type": "vila", "path": str(model_dir), "dtype": "float32", "trust_remote_code": True},
            "calib": {"name": "custom_mm", "path": str(calib), "n_samples": 4, "bs": 2, "seq_len": 256},
            "quant": quant, "save": {"save_path": str(out), "save_trans": False, "save_fake": True}}


@pytest.mark.parametrize("method, special", [("RTN", None), ("AWQ", {"n_grid": 4, "clip_grid": 4})])
def test_cli_quantizes_vila(method, special, vila_dir, calib_dir, tmp_path):
    """`python -m llmc` with model.trust_remote_code: true (the CLI process never imports vila_tiny)."""
    cfg = tmp_path / "job.yml"
    cfg.write_text(yaml.safe_dump(_job(method, vila_dir, calib_dir, tmp_path / "out", special)))
    proc = subprocess.run([sys.executable, "-m", "llmc", str(cfg)], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = load_plan(tmp_path / "out" / "quant_layers.json").settings()
    assert any(n.startswith("llm.model.layers.") for n in layers)
    assert any(n.startswith("vision_tower.") for n in layers)
    fake = tmp_path / "out" / "fake"
    original = load_adapter("vila", str(vila_dir), dtype="float32")
    quantized = load_adapter("vila", str(fake), dtype="float32")
    batch = original.batch_process(load_samples("custom_mm", calib_dir, 2))
    with torch.no_grad():
        ref, out = original.model(**batch).logits, quantized.model(**batch).logits
    err = float((out - ref).abs().max() / ref.abs().max())
    assert 1e-4 < err < 0.5  # W4 changed the model, which still computes about the same function
    w = quantized.module("llm.model.layers.0.mlp.down_proj").weight.detach()
    for row in w.reshape(w.shape[0], -1, 32)[:4]:  # W4 groups of 32: at most 16 distinct values each
        assert all(len(torch.unique(g)) <= 16 for g in row)
