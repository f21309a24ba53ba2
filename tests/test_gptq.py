"""GPTQ against a slow plain OBS reference, against RTN, and end to end through the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from llmc.algorithms import build_algorithms
from llmc.algorithms.gptq import GPTQ, GPTQOptions, gptq_quantize_weight
from llmc.algorithms.hessian import HessianStats
from llmc.context import BlockContext, CachedCall
from llmc.models.layout import BlockLayout, LayerGroup
from llmc.plan import Part, load_plan, plan_of_block, single_layer
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import (
    QuantSpec,
    compute_qparams,
    dequantize,
    fake_quantize,
    rtn_fake_quantize,
)

G16 = QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16)
CH = QuantSpec(bits=4, symmetric=False, granularity="per_channel")
SYM = QuantSpec(bits=3, symmetric=True, granularity="per_group", group_size=16)


# ---------------------------------------------------------------- helpers
def toy_inputs(n: int, cols: int, seed: int = 0, outliers: tuple[int, ...] = (3, 17, 40)) -> torch.Tensor:
    """Correlated rows (random mixing of fewer factors) with a few large-magnitude channels."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols // 2, generator=g)
    x = z @ torch.randn(cols // 2, cols, generator=g) / (cols // 2) ** 0.5 + 0.1 * torch.randn(n, cols, generator=g)
    x[:, [o for o in outliers if o < cols]] *= 20.0
    return x


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2.0 / x.shape[0] * x.t() @ x


def slow_gptq(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, percdamp: float = 0.01,
              actorder: bool = False, static_groups: bool = False) -> torch.Tensor:
    """Plain OBS: one column at a time, explicit inverse Hessian, rank-1 elimination; no blocks, no Cholesky."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    gl = spec.group_len(n)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = compute_qparams(W, spec) if static_groups else None
    perm = torch.argsort(torch.diag(H), descending=True) if actorder else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(n):
        if static is not None:
            g = int(perm[j]) // gl
            s, z = static[0][:, g: g + 1], static[1][:, g: g + 1]
        elif j % gl == 0:
            s, z = compute_qparams(W[:, j: j + gl], spec)
        q = fake_quantize(W[:, j: j + 1], s, z, spec)[:, 0]
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
        Q[:, j] = q
    return Q[:, torch.argsort(perm)]


def case(seed: int = 0, out_f: int = 8, cols: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 100)
    W = torch.randn(out_f, cols, generator=g, dtype=torch.float64)
    return W, hessian(toy_inputs(256, cols, seed).double())


# ------------------------------------------------------------------ numerics
@pytest.mark.parametrize("spec", [G16, CH, SYM], ids=["g16", "channel", "sym3g16"])
@pytest.mark.parametrize("actorder", [False, True])
def test_equals_slow_reference(spec: QuantSpec, actorder: bool) -> None:
    W, H = case()
    ref = slow_gptq(W, H, spec, actorder=actorder)
    for bs in (128, 7):  # a block size that does not align with the groups
        W_q, scale, zero, g_idx = gptq_quantize_weight(W, H, spec, blocksize=bs, actorder=actorder)
        assert torch.allclose(W_q, ref, atol=1e-6), (bs, (W_q - ref).abs().max())
    assert not torch.allclose(ref, rtn_fake_quantize(W.float(), spec).double(), atol=1e-3)


@pytest.mark.parametrize("actorder", [False, True])
def test_static_groups_equal_reference(actorder: bool) -> None:
    W, H = case(1)
    ref = slow_gptq(W, H, G16, actorder=actorder, static_groups=True)
    W_q, scale, zero, g_idx = gptq_quantize_weight(W, H, G16, blocksize=5, actorder=actorder, static_groups=True)
    assert torch.allclose(W_q, ref, atol=1e-6)
    assert g_idx is None  # static groups stay contiguous in the original order
    s0, z0 = compute_qparams(W, G16)
    assert torch.equal(scale, s0) and torch.equal(zero, z0)
    assert torch.equal(fake_quantize(W_q, scale, zero, G16), W_q)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("actorder", [False, True])
def test_beats_rtn_on_output_error(bits: int, actorder: bool) -> None:
    x = toy_inputs(512, 64, seed=2)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    spec = QuantSpec(bits=bits, symmetric=False, granularity="per_group", group_size=16)
    W_q, *_ = gptq_quantize_weight(W, hessian(x), spec, actorder=actorder)
    err_gptq = torch.linalg.norm(x @ W.t() - x @ W_q.t())
    err_rtn = torch.linalg.norm(x @ W.t() - x @ rtn_fake_quantize(W, spec).t())
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)


def test_g_idx_with_actorder_reproduced_by_fake_linear() -> None:
    W, H = case(4)
    W, H = W.float(), H.float()
    W_q, scale, zero, g_idx = gptq_quantize_weight(W, H, G16, actorder=True)
    assert g_idx is not None and g_idx.shape == (64,) and scale.shape == (8, 4)
    assert torch.equal(torch.bincount(g_idx), torch.full((4,), 16))  # 16 channels per group
    assert not torch.equal(g_idx, torch.arange(64) // 16)  # the permuted order really differs
    lin = nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(W_q)
    fq = FakeQuantLinear.from_linear(lin, single_layer(lin, G16), scale, zero, g_idx)
    assert torch.equal(fq.quantized_weight(), W_q)
    q = fq.int_weight()
    assert torch.equal(dequantize(q, scale, zero, g_idx), W_q)
    for g in range(4):
        for r in range(8):
            assert q[r, g_idx == g].unique().numel() <= 2**G16.bits
            assert W_q[r, g_idx == g].unique().numel() <= 2**G16.bits
    # contiguous groups would not reproduce the GPTQ weights
    assert not torch.equal(fake_quantize(W_q, scale, zero, G16), W_q)


def test_dead_inputs_zeroed() -> None:
    W, H = case(5)
    H[:, [2, 9]] = 0
    H[[2, 9], :] = 0
    for actorder in (False, True):
        W_q, *_ = gptq_quantize_weight(W, H, G16, actorder=actorder)
        assert torch.isfinite(W_q).all() and W_q[:, [2, 9]].abs().max() == 0
        assert torch.allclose(W_q, slow_gptq(W, H, G16, actorder=actorder), atol=1e-6)


def test_padding_rows_do_not_change_hessian() -> None:
    x = torch.randn(2, 10, 16, dtype=torch.float32)
    w = torch.ones(2, 10)
    w[0, 7:] = 0
    w[1, 4:] = 0
    padded = x.clone()
    padded[w == 0] = 1e3  # garbage in padding
    a, b = HessianStats(16), HessianStats(16)
    a.add_batch(padded, w)
    b.add_batch(x[0, :7])
    b.add_batch(x[1, :4])
    assert torch.allclose(a.H, b.H, atol=1e-5)
    assert torch.allclose(a.H, hessian(torch.cat([x[0, :7], x[1, :4]])), atol=1e-5)
    c = HessianStats(16)  # weighted rows: H = 2/sum(w) * sum w_i x_i x_i^T
    wt = torch.tensor([2.0, 0.5, 0.0, 1.0])
    c.add_batch(x[0, :4], wt)
    assert torch.allclose(c.H, 2.0 / 3.5 * (x[0, :4] * wt[:, None]).t() @ x[0, :4], atol=1e-5)


# ------------------------------------------------------------ process_block
class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 32)
        self.fc3 = nn.Linear(48, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h) + self.fc3(h)


def toy_ctx(block: Toy, calls: list[CachedCall], skip: str) -> BlockContext:
    layout = BlockLayout(groups=(LayerGroup("in", ("fc1",), inspect="fc1"),
                                 LayerGroup("out", ("fc2", "fc3"), inspect="fc2")))
    spec = QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=16)
    plan = plan_of_block("blocks.0", block, layout, lambda n: None if n.endswith(skip) else spec)
    return BlockContext(part=Part.LANGUAGE, index=0, prefix="blocks.0", block=block, layout=layout, calls=calls,
                        device=torch.device("cpu"), plan=plan)


@pytest.mark.parametrize("true_sequential", [True, False])
def test_process_block_sequential_weighted(true_sequential: bool) -> None:
    torch.manual_seed(1)
    xs = [toy_inputs(2 * 12, 32, seed=s).reshape(2, 12, 32) for s in (6, 7)]
    ws = [torch.ones(2, 12), torch.ones(2, 12)]
    ws[0][1, 5:] = 0
    ws[1][0, 9:] = 0
    ws[1][1, :3] = 2.0  # e.g. image tokens weighted up
    calls = [CachedCall((x,), {}, w) for x, w in zip(xs, ws)]
    block = Toy()
    float_block = Toy()
    ctx = toy_ctx(block, calls, skip="fc3")
    algo = GPTQ(GPTQOptions(true_sequential=true_sequential, blocksize=8), quant=None)
    algo.process_block(ctx)
    assert isinstance(block.fc1, FakeQuantLinear) and isinstance(block.fc2, FakeQuantLinear)
    assert type(block.fc3) is nn.Linear and torch.equal(block.fc3.weight, float_block.fc3.weight)

    def stats(fn) -> torch.Tensor:
        s = HessianStats(fn(xs[0]).shape[-1])
        for x, w in zip(xs, ws):
            s.add_batch(fn(x), w)
        return s.H

    spec = ctx.spec("fc1")
    with torch.no_grad():
        W1, s1, z1, _ = gptq_quantize_weight(float_block.fc1.weight, stats(lambda x: x), spec, blocksize=8)
        assert torch.equal(block.fc1.quantized_weight(), W1) and torch.equal(block.fc1.weight, W1)
        assert torch.equal(block.fc1.scale, s1) and torch.equal(block.fc1.zero, z1)
        fc1 = block.fc1 if true_sequential else float_block.fc1  # later groups see quantized earlier ones
        W2, *_ = gptq_quantize_weight(float_block.fc2.weight, stats(lambda x: torch.relu(fc1(x))), spec,
                                      blocksize=8)
        assert torch.allclose(block.fc2.quantized_weight(), W2, atol=1e-6)
        other = block.fc1 if not true_sequential else float_block.fc1
        W2b, *_ = gptq_quantize_weight(float_block.fc2.weight, stats(lambda x: torch.relu(other(x))), spec)
        assert not torch.allclose(block.fc2.quantized_weight(), W2b, atol=1e-6)
    assert set(algo.record.layers) == {"blocks.0.fc1", "blocks.0.fc2"}


# ---------------------------------------------------------------- end to end
def _job(tmp_path: Path, model: Path, model_type: str, calib: dict, objects: list[str]) -> Path:
    cfg = {
        "base": {"seed": 0},
        "model": {"type": model_type, "path": str(model), "dtype": "float32"},
        "calib": {**calib, "n_samples": 4, "bs": 2, "seq_len": 256},
        "quant": {"method": "GPTQ", "quant_objects": objects,
                  "weight": {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32},
                  "special": {"actorder": True}},
        "save": {"save_path": str(tmp_path / "out"), "save_fake": True},
        "run": {"device": "cpu", "stream": False},  # the in-memory model is inspected afterwards
    }
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run_cli(job: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run the CLI in-process; return the quantized in-memory adapter and the save path."""
    from llmc import runner
    from llmc.cli import main

    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    seen = {}
    orig = runner.quantize_model

    def spy(cfg, adapter, device, **kw):
        seen["adapter"] = adapter
        return orig(cfg, adapter, device, **kw)

    monkeypatch.setattr(runner, "quantize_model", spy)
    assert main([str(job)]) == 0
    return seen["adapter"], tmp_path / "out"


def _check_fake_folder(adapter, out: Path, model_type: str, samples) -> None:
    from llmc.models import load_adapter

    fqs = {n: m for n, m in adapter.model.named_modules() if isinstance(m, FakeQuantLinear)}
    layers = load_plan(out / "quant_layers.json").settings()
    assert set(layers) == set(fqs) and all(v == "w4ag32" for v in layers.values())
    assert all(m.g_idx is not None for m in fqs.values())
    reloaded = load_adapter(model_type, str(out / "fake"), "float32")
    rmods = dict(reloaded.model.named_modules())
    for n, m in fqs.items():
        assert torch.equal(rmods[n].weight, m.quantized_weight())
    batch = adapter.batch_process(samples, with_answer=True, max_length=256)
    with torch.no_grad():
        a = adapter.model(**batch).logits
        b = reloaded.model(**batch).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cli_qwen2_vl_vision_and_language(tiny_model, calib_dir, tmp_path, monkeypatch) -> None:
    from llmc.calib import load_samples

    job = _job(tmp_path, tiny_model("qwen2_vl"), "qwen2_vl", {"name": "custom_mm", "path": str(calib_dir)},
               ["vision", "language"])
    adapter, out = _run_cli(job, monkeypatch, tmp_path)
    names = set(load_plan(out / "quant_layers.json").settings())
    assert any(".visual.blocks." in n for n in names) and any(".language_model.layers." in n for n in names)
    _check_fake_folder(adapter, out, "qwen2_vl", load_samples("custom_mm", calib_dir, 2))


def test_cli_qwen2_text_only(tiny_model, tmp_path, monkeypatch) -> None:
    from llmc.calib import load_samples

    texts = [f"Sample {i}: the quick brown fox jumps over {i + 2} lazy dogs near the river bank."
             for i in range(6)]
    data = tmp_path / "txt"
    data.mkdir()
    (data / "data.json").write_text(json.dumps(texts))
    job = _job(tmp_path, tiny_model("qwen2"), "qwen2", {"name": "custom_txt", "path": str(data)}, ["language"])
    adapter, out = _run_cli(job, monkeypatch, tmp_path)
    _check_fake_folder(adapter, out, "qwen2", load_samples("custom_txt", data, 2))


def test_config_file() -> None:
    from llmc.config import QuantConfig
    from llmc.strict import from_dict

    path = Path(__file__).resolve().parents[1] / "configs" / "gptq_w4a16.yml"
    data = yaml.safe_load(path.read_text())
    assert data["model"]["path"].startswith("builtin:") and data["calib"]["path"].startswith("builtin:")
    assert data["save"]["save_path"] == "../runs/gptq_w4a16"
    algos = build_algorithms(from_dict(QuantConfig, data["quant"], "quant"))
    assert [a.name for a in algos] == ["GPTQ"]


@pytest.mark.parametrize("spec", [G16, QuantSpec(bits=3, symmetric=True, granularity="per_group", group_size=16)],
                         ids=["asym4g16", "sym3g16"])
def test_sub_blocks_change_speed_only(monkeypatch, spec: QuantSpec) -> None:
    """The lazy-update sub-blocks (any size, aligned with the groups or not) give the same weights in float64."""
    import llmc.algorithms.gptq as gptq

    W, H = case(5)
    results = []
    for inner in (10**6, 12, 5):
        monkeypatch.setattr(gptq, "INNER", inner)
        results.append(gptq_quantize_weight(W, H, spec, blocksize=40)[0])
    assert all(torch.equal(r, results[0]) for r in results[1:])
    assert torch.allclose(results[0], slow_gptq(W, H, spec), atol=1e-6)


@pytest.mark.parametrize("flush", [10**6, 9, 4])
def test_buffered_rows_give_the_sum_of_every_batch(flush, monkeypatch) -> None:
    """Rows are buffered over batches (``FLUSH_ROWS``) and multiplied at once: buffer never flushed,
    flushed mid-batch sequence, and batches larger than the buffer; weighted rows and padding among
    them; ``H`` read midway (it flushes) and more batches after it. Same ``H`` as the plain sum."""
    from llmc.algorithms import hessian
    from llmc.algorithms.hessian import HessianStats

    monkeypatch.setattr(hessian, "FLUSH_ROWS", flush)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, n, 6, generator=g) for n in (3, 5, 2, 7, 1, 4)]
    ws = [torch.tensor([[1.0, 0.0, 2.0]]), None, None, torch.full((1, 7), 0.5), None, torch.ones(1, 4)]
    stats = HessianStats(6)
    total, n = torch.zeros(6, 6, dtype=torch.float64), 0.0
    for i, (x, w) in enumerate(zip(xs, ws)):
        stats.add_batch(x, w)
        rows = x[0].double()
        wr = torch.ones(rows.shape[0], dtype=torch.float64) if w is None else w[0].double()
        total += (rows * wr[:, None]).t() @ rows
        n += float(wr.sum())
        if i == 2:
            assert torch.allclose(stats.H.double(), 2 / n * total, atol=1e-5)
    assert torch.allclose(stats.H.double(), 2 / n * total, atol=1e-5)
    assert stats.n == n


@pytest.mark.parametrize("band", [512, 16, 7])
def test_bfloat16_hessian_is_close_to_float32(band, monkeypatch) -> None:
    """``hessian_dtype: bfloat16``: each batch's product rounded to bf16, accumulated in float32, in bands
    of ``BAND`` rows of the upper triangle (48 columns: one band, three, seven uneven ones), mirrored
    into an exactly symmetric ``H`` whenever it is read."""
    from llmc.algorithms import hessian
    from llmc.algorithms.hessian import HessianStats

    monkeypatch.setattr(hessian, "BAND", band)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 64, 48, generator=g).to(torch.bfloat16) for _ in range(8)]
    full, fast = HessianStats(48), HessianStats(48, compute_dtype=torch.bfloat16)
    for i, x in enumerate(xs):
        full.add_batch(x)
        fast.add_batch(x)
        if i == 3:  # reading H midway (upper triangle mirrored) and adding more batches after it
            assert torch.equal(fast.H, fast.H.t())
    rel = float((fast.H - full.H).norm() / full.H.norm())
    assert 0 < rel < 5e-3, rel  # rounded, but only at bf16 level
    assert torch.equal(fast.H, fast.H.t())
