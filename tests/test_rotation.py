"""Rotation (QuaRot/SpinQuant): orthogonal matrices, exactness on every adapter family, save/reload, quality."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from llmc.algorithms import algorithm_class, build_algorithms
from llmc.algorithms.rotation import Rotation, fold_norm, head_blocks, is_mean_centering
from llmc.calib import load_samples
from llmc.config import QuantConfig, parse_config
from llmc.models import load_adapter
from llmc.quant.hadamard import (
    random_hadamard,
    random_orthogonal,
    rotation_matrix,
    split_pow2,
    sylvester_hadamard,
)
from llmc.quant.primitives import QuantSpec, rtn_fake_quantize
from llmc.testing import tiny_more, tiny_more2
from llmc.testing.tiny_models import FAMILIES, VLM_FAMILIES

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


MORE_TYPES = {**tiny_more.MODEL_TYPES, **tiny_more2.MODEL_TYPES}
# families beyond tiny_models.FAMILIES whose rotation is exact (raw-weight writers, cross-attention)
EXACT_MORE = ("llava_next", "llava_onevision", "mllama", "paligemma", "mistral3", "internvl", "idefics3", "qwen3_vl")


def adapter_type(family: str) -> str:
    if family in MORE_TYPES:
        return MORE_TYPES[family]
    return "llava" if family.startswith("llava") else family


def load(tiny_model, family: str, path: Path | None = None):
    return load_adapter(adapter_type(family), str(path or tiny_model(family)), dtype="float32",
                        attn_implementation="eager")


def rotation(**special) -> Rotation:
    algo = build_algorithms(QuantConfig(method=["Rotation"], special=special))[0]
    assert isinstance(algo, Rotation)
    return algo


@torch.no_grad()
def logits(adapter, batch) -> torch.Tensor:
    return adapter.model(**batch, use_cache=False).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def samples(calib_dir):
    out = load_samples("custom_mm", str(calib_dir), 2)
    assert all(s.images for s in out)
    return out


def batch_of(adapter, samples):
    batch = adapter.batch_process(samples)
    if adapter.is_vlm:
        assert adapter.image_token_mask(batch["input_ids"]).sum() > 0  # the batch really carries images
    return batch


@torch.no_grad()
def perturb(adapter, seed: int = 1) -> None:
    """Non-trivial norm scales and biases so that folding and bias rotation are exercised."""
    g = torch.Generator().manual_seed(seed)
    model, t = adapter.model, adapter.rotation_targets()
    norms = [model.get_submodule(t.final_norm)]
    biased = [model.get_submodule(n) for n in t.external_writers]
    for block in adapter.blocks("language"):
        layout = adapter.block_layout("language", block)
        norms += [block.get_submodule(n) for n in layout.norms]
        biased += [block.get_submodule(n) for n in layout.linears()]
    for m in norms:
        m.weight.mul_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
    for m in biased:
        if m.bias is not None:
            m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=g))


# --------------------------------------------------------------------------------------- matrices
@pytest.mark.parametrize("n", [1, 2, 4, 64, 128])
def test_sylvester_hadamard(n):
    h = sylvester_hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [12, 24, 48, 64, 96, 448, 1536])
def test_random_hadamard_orthogonal(n):
    q = random_hadamard(n, seed=3)
    assert q.dtype == torch.float64 and q.shape == (n, n)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(q, random_hadamard(n, seed=3))
    assert not torch.allclose(q, random_hadamard(n, seed=4))
    p, m = split_pow2(n)
    if m == 1:  # a true Hadamard: every entry is ±1/sqrt(n)
        assert torch.allclose(q.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64))
    else:  # 1536 = 512 * 3: Hadamard of 512 (with signs) ⊗ orthogonal 3x3
        assert torch.equal(q, torch.kron(random_hadamard(p, 3), random_orthogonal(m, 4)))


@pytest.mark.parametrize("n", [3, 12, 64, 96])
def test_random_orthogonal(n):
    q = random_orthogonal(n, seed=0)
    assert torch.allclose(q.T @ q, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(rotation_matrix(n, "random", 0), q)
    assert rotation_matrix(n, "hadamard", 0, torch.float32).dtype == torch.float32


def test_matrix_errors():
    assert split_pow2(3584) == (512, 7) and split_pow2(1536) == (512, 3)
    with pytest.raises(ValueError, match="power of two"):
        sylvester_hadamard(12)
    with pytest.raises(ValueError, match="positive integer"):
        random_hadamard(0, 0)
    with pytest.raises(ValueError, match="valid: \\['hadamard', 'random'\\]"):
        rotation_matrix(8, "spin", 0)


# ------------------------------------------------------------------------------------- pure pieces
def test_fold_layernorm_with_bias_into_consumers():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5)
        norm.bias.normal_(0.0, 0.5)
    lins = [nn.Linear(16, 8), nn.Linear(16, 4)]
    x = torch.randn(5, 16)
    with torch.no_grad():
        ref = [lin(norm(x)) for lin in lins]
        fold_norm(norm, lins, 0.0, CPU)
        out = [lin(norm(x)) for lin in lins]
    assert torch.allclose(norm.weight, torch.ones(16)) and norm.bias.abs().max() == 0
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, atol=1e-5)
    assert is_mean_centering(norm, 16)
    with pytest.raises(ValueError, match="no bias|have none"):
        fold_norm(nn.LayerNorm(16), [nn.Linear(16, 8, bias=False)], 0.0, CPU)


def test_fold_norm_weight_offset():
    """Gemma-style norms scale by (1 + weight): the folded scale is weight + 1, the reset weight 0."""
    norm = nn.Module()
    norm.weight = nn.Parameter(torch.tensor([0.5, -0.25, 1.0, 0.0]))
    lin = nn.Linear(4, 2, bias=False)
    w0 = lin.weight.detach().clone()
    fold_norm(norm, [lin], 1.0, CPU)
    assert torch.allclose(lin.weight, w0 * torch.tensor([1.5, 0.75, 2.0, 1.0]))
    assert torch.equal(norm.weight.detach(), torch.zeros(4))


def test_head_blocks_gqa_mapping():
    rots = [torch.full((2, 2), float(g + 1)) for g in range(2)]  # kv heads 0, 1
    hv, ho = head_blocks(rots, num_heads=4)
    assert hv.shape == (4, 4) and ho.shape == (8, 8)
    assert [ho[2 * i, 2 * i].item() for i in range(4)] == [1.0, 1.0, 2.0, 2.0]  # heads 0,1 -> kv 0; 2,3 -> kv 1
    with pytest.raises(ValueError, match="multiple"):
        head_blocks(rots * 2, num_heads=6)


def test_registration_and_options():
    assert algorithm_class("QuaRot") is Rotation
    algo = rotation()
    assert not algo.quantizes and not algo.needs_calib
    algos = build_algorithms(QuantConfig(method=["Rotation"], special={"rotate_mode": "random"}))
    assert [a.name for a in algos] == ["Rotation", "RTN"]
    with pytest.raises(ValueError, match="valid"):
        rotation(rotate_mode="spin")


# ------------------------------------------------------------------------------- model exactness
@pytest.mark.parametrize("family", FAMILIES + EXACT_MORE)
def test_rotated_model_equals_original(family, tiny_model, samples):
    adapter = load(tiny_model, family)
    perturb(adapter)
    batch = batch_of(adapter, samples)
    ref = logits(adapter, batch)
    t = adapter.rotation_targets()
    tied_before = adapter.lm_head().weight is adapter.module(t.embeddings[0]).weight
    emb_before = adapter.embed_tokens().weight.detach().clone()
    algo = rotation()
    algo.prepare_model(adapter, CPU)
    out = logits(adapter, batch)
    assert rel_err(out, ref) < 1e-4
    rec = algo.record  # replayable: the embedding is E @ rotation_matrix(hidden, mode, seed)
    q = rotation_matrix(rec.hidden_size, rec.rotate_mode, rec.rotation_seed)
    assert torch.allclose(adapter.embed_tokens().weight.double(), emb_before.double() @ q, atol=1e-6)
    assert rec.untied_lm_head == tied_before
    assert rec.hidden_size == adapter.embed_tokens().weight.shape[1]
    assert len(rec.heads) == len(adapter.blocks("language"))
    lm, emb = adapter.lm_head().weight, adapter.embed_tokens().weight
    assert lm.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
    assert not adapter.model.config.tie_word_embeddings
    norm = adapter.final_norm().weight + t.norm_weight_offset  # effective scale: 1 (Gemma: weight 0)
    assert torch.allclose(norm, torch.ones_like(norm))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_maths_keeps_weights_in_place(tiny_model, samples):
    """The maths run on the given device; the (CPU-resident) model stays where it is and matches the CPU result."""
    cpu, gpu = load(tiny_model, "qwen2_5_vl"), load(tiny_model, "qwen2_5_vl")
    rotation().prepare_model(cpu, CPU)
    rotation().prepare_model(gpu, torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in gpu.model.parameters())
    batch = batch_of(cpu, samples)
    assert rel_err(logits(gpu, batch), logits(cpu, batch)) < 1e-5


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_projector_not_rotated_breaks_images(family, tiny_model, samples, monkeypatch):
    """Control: leaving the projector's last linear unrotated changes the logits, so the test above can fail."""
    adapter = load(tiny_model, family)
    batch = batch_of(adapter, samples)
    ref = logits(adapter, batch)
    targets = adapter.rotation_targets()
    assert targets.external_writers
    monkeypatch.setattr(adapter, "rotation_targets", lambda: replace(targets, external_writers=()))
    rotation().prepare_model(adapter, CPU)
    assert rel_err(logits(adapter, batch), ref) > 1e-2


@pytest.mark.parametrize("mode", ["hadamard", "random"])
def test_head_rotation_gqa(mode, tiny_model, samples):
    """qwen2 has 4 query heads on 2 kv heads: head rotations change v/o weights and keep the logits."""
    weights, outs = [], []
    for heads in (False, True):
        adapter = load(tiny_model, "qwen2")
        batch = batch_of(adapter, samples)
        ref = logits(adapter, batch)
        algo = rotation(rotate_mode=mode, rotation_seed=5, rotate_heads=heads)
        algo.prepare_model(adapter, CPU)
        outs.append(rel_err(logits(adapter, batch), ref))
        block = adapter.blocks("language")[0]
        weights.append((block.self_attn.v_proj.weight.clone(), block.self_attn.o_proj.weight.clone()))
    assert max(outs) < 1e-4
    assert not torch.allclose(weights[0][0], weights[1][0]) and not torch.allclose(weights[0][1], weights[1][1])
    rec = algo.record.heads[0]
    assert (rec["num_heads"], rec["num_kv_heads"], rec["head_dim"]) == (4, 2, 16)


def test_mean_centering_norm_refused(tiny_model):
    adapter = load(tiny_model, "llama")
    block = adapter.blocks("language")[0]
    block.input_layernorm = nn.LayerNorm(64)
    emb = adapter.embed_tokens().weight.detach().clone()
    with pytest.raises(ValueError, match="subtracts the mean"):
        rotation().prepare_model(adapter, CPU)
    assert torch.equal(adapter.embed_tokens().weight, emb)  # refused before touching any weight


# ------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("granularity, group_size, bound", [("per_channel", 128, 0.6), ("per_group", 128, 0.65),
                                                             ("per_group", 32, 0.95)])
def test_rotation_reduces_w4_error_with_outlier_channels(granularity, group_size, bound):
    """W4 RTN of ``W Q`` (input ``x Q``) beats RTN of ``W`` when a few input channels are outliers."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[:, [3, 70, 150, 201]] *= 50.0  # outlier input channels
    x = torch.randn(128, 256, generator=g)
    y = x @ w.T
    spec = QuantSpec(bits=4, symmetric=False, granularity=granularity, group_size=group_size)
    q = random_hadamard(256, seed=0, dtype=torch.float32)
    wr, xr = w @ q, x @ q
    assert torch.allclose(xr @ wr.T, y, atol=1e-4)  # the float function is unchanged
    err_rtn = (x @ rtn_fake_quantize(w, spec).T - y).norm()
    err_rot = (xr @ rtn_fake_quantize(wr, spec).T - y).norm()
    assert err_rot < bound * err_rtn


# ------------------------------------------------------------------------------------- end to end
def write_config(src: Path, dst: Path, model: Path, save: Path) -> Path:
    data = yaml.safe_load(src.read_text())
    data["model"]["path"] = str(model)
    data["save"]["save_path"] = str(save)
    dst.write_text(yaml.safe_dump(data))
    return dst


def test_cli_rotation_rtn_save_reload(tiny_model, samples, tmp_path):
    family = "qwen2_vl"  # tied embeddings
    src = tmp_path / "src"  # with non-trivial norms: the untied lm_head then differs from the embeddings
    base = load(tiny_model, family)
    perturb(base)
    base.model.save_pretrained(src)
    base.processor.save_pretrained(src)
    cfg_file = write_config(REPO / "configs" / "quarot_rtn_w4a16.yml", tmp_path / "job.yml", src, tmp_path / "out")
    env = {**os.environ, "LLMC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmc", str(cfg_file)], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"

    original = load(tiny_model, family, src)
    assert original.model.config.tie_word_embeddings
    batch = batch_of(original, samples)
    ref = logits(original, batch)

    from llmc.runner import quantize_model

    cfg = parse_config(yaml.safe_load(cfg_file.read_text()), root=tmp_path)
    memory = load(tiny_model, family, src)
    quantize_model(cfg, memory, CPU)
    fake_ref = logits(memory, batch)
    assert rel_err(fake_ref, ref) > 1e-3  # W4 really changed the model

    fake = load(tiny_model, family, out / "fake")
    assert rel_err(logits(fake, batch), fake_ref) < 1e-5
    trans = load(tiny_model, family, out / "trans")
    assert rel_err(logits(trans, batch), ref) < 1e-4
    for reloaded in (fake, trans):
        assert not reloaded.model.config.tie_word_embeddings
        lm, emb = reloaded.lm_head().weight, reloaded.embed_tokens().weight
        assert lm.untyped_storage().data_ptr() != emb.untyped_storage().data_ptr()
        assert not torch.allclose(lm, emb)


def test_shipped_configs_parse():
    for name in ("quarot_rtn_w4a16.yml", "quarot_gptq_w4a16.yml"):
        data = yaml.safe_load((REPO / "configs" / name).read_text())
        cfg = parse_config({**data, "model": {**data["model"], "path": str(REPO)},
                            "calib": None, "save": {"save_path": "/tmp/unused"}}, root=REPO)
        algos = build_algorithms(cfg.quant)
        assert algos[0].name == "Rotation" and algos[0].options.rotate_mode == "hadamard"
        assert algos[-1].quantizes


def test_rotation_then_gptq_in_process(tiny_model, samples, calib_dir, tmp_path):
    """The shipped [Rotation, GPTQ] config runs on a VLM: rotated, GPTQ-quantized, close to the float model."""
    data = yaml.safe_load((REPO / "configs" / "quarot_gptq_w4a16.yml").read_text())
    data["model"]["path"] = str(tiny_model("qwen2_vl"))
    data["calib"].update(path=str(calib_dir), n_samples=4, bs=2)
    data["save"]["save_path"] = str(tmp_path / "unused")
    cfg = parse_config(data, root=tmp_path)
    from llmc.runner import quantize_model

    adapter = load(tiny_model, "qwen2_vl")
    batch = batch_of(adapter, samples)
    ref = logits(adapter, batch)
    layers = quantize_model(cfg, adapter, CPU)
    assert any(name.startswith(adapter.blocks_path("language")) for name in layers)
    assert not adapter.model.config.tie_word_embeddings
    err = rel_err(logits(adapter, batch), ref)
    assert 1e-4 < err < 0.5

