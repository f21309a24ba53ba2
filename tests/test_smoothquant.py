"""SmoothQuant: scales against a hand computation, W8A8 gain on outliers, exact folding, CLI end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import llmc
from llmc.algorithms import build_algorithms
from llmc.algorithms.smoothquant import SmoothQuant, SmoothQuantOptions, smooth_scales
from llmc.calib import batches, load_samples
from llmc.config import ConfigError, QuantConfig, parse_config
from llmc.context import BlockContext, CachedCall
from llmc.models import load_adapter
from llmc.models.layout import BlockLayout, LayerGroup, Producer
from llmc.pipeline import capture
from llmc.plan import Part, load_plan, plan_of_block
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec

REPO = Path(llmc.__file__).resolve().parent.parent
W8 = QuantSpec(8, True, "per_channel")
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ toy block
class ToyBlock(nn.Module):
    """norm -> (fc1, fc2), summed: one layer group with a norm producer."""

    def __init__(self, c: int = 64, h: int = 96) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(c)
        self.fc1 = nn.Linear(c, h)
        self.fc2 = nn.Linear(c, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return self.fc1(y) + self.fc2(y)


TOY_LAYOUT = BlockLayout(groups=(LayerGroup("in", ("fc1", "fc2"), inspect="fc1",
                                            producer=Producer("norm", "norm")),))


def toy_block(seed: int = 0) -> ToyBlock:
    torch.manual_seed(seed)
    block = ToyBlock()
    with torch.no_grad():
        block.norm.weight.uniform_(0.5, 1.5)
    return block


def outlier_input(n: int, seed: int, outliers=(3, 17, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, 64, generator=g)
    x[..., list(outliers)] *= 80.0
    return x


def toy_ctx(block: nn.Module, calls: list[CachedCall], act_bits: int | None = 8) -> BlockContext:
    return BlockContext(part=Part.LANGUAGE, index=0, prefix="toy", block=block, layout=TOY_LAYOUT, calls=calls,
                        device=CPU, plan=plan_of_block("toy", block, TOY_LAYOUT, lambda n: W8, act_bits=act_bits))


def sq(alpha: float = 0.5, act: bool = True) -> SmoothQuant:
    return SmoothQuant(SmoothQuantOptions(alpha=alpha), QuantConfig(act={"bit": 8} if act else None))


# ------------------------------------------------------------------------------------------ numerics
def test_smooth_scales_formula_and_guards() -> None:
    a = torch.tensor([4.0, 9.0, 0.0, 1.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smooth_scales(a, w, 0.5)
    assert torch.allclose(s[:2], torch.tensor([2.0, 1.5]))
    assert s[2] == 1.0 and s[3] == 1.0  # dead channel / zero weight column: left alone
    assert torch.allclose(smooth_scales(a[:2], w[:2], 0.75), a[:2] ** 0.75 / w[:2] ** 0.25)
    assert torch.isfinite(smooth_scales(torch.tensor([1e30]), torch.tensor([1e-30]), 1.0)).all()


def test_scales_match_hand_computation_on_toy() -> None:
    block = toy_block()
    xs = [outlier_input(8, seed=i) for i in range(2)]
    with torch.no_grad():
        h = torch.cat([block.norm(x).reshape(-1, 64) for x in xs])
        w = torch.cat([block.fc1.weight, block.fc2.weight])
    expected = h.abs().amax(0) ** 0.6 / w.abs().amax(0) ** 0.4
    algo = sq(alpha=0.6)
    algo.process_block(toy_ctx(block, [CachedCall((x,), {}, None) for x in xs]))
    assert torch.allclose(algo.record.scales["toy.in"], expected, rtol=1e-5)
    assert isinstance(block.fc1, FakeQuantLinear) and block.fc1.act_bits == 8 and block.fc1.spec == W8
    replay = toy_block()  # the records replay onto a fresh block: same smoothed float weights
    assert algo.apply(toy_ctx(replay, []), algo.record.scales) == ["toy.in"]
    for name in ("norm.weight", "fc1.weight", "fc2.weight"):
        assert torch.equal(replay.get_parameter(name), block.get_parameter(name)), name


def _rel_err(block: nn.Module, ref: nn.Module, xs: list[torch.Tensor]) -> float:
    with torch.no_grad():
        num = sum(((block(x) - ref(x)) ** 2).sum() for x in xs)
        den = sum((ref(x) ** 2).sum() for x in xs)
    return float((num / den).sqrt())


def test_w8a8_smoothing_beats_plain_w8a8_on_outlier_channels() -> None:
    from llmc.algorithms.rtn import RTN

    calib = [outlier_input(16, seed=i) for i in range(2)]
    test = [outlier_input(16, seed=100 + i) for i in range(2)]
    ref = toy_block()
    plain, smoothed = toy_block(), toy_block()
    RTN(None, QuantConfig(act={"bit": 8})).process_block(toy_ctx(plain, [CachedCall((x,), {}) for x in calib]))
    sq().process_block(toy_ctx(smoothed, [CachedCall((x,), {}) for x in calib]))
    assert isinstance(plain.fc1, FakeQuantLinear) and plain.fc1.act_bits == 8
    e_plain, e_sq = _rel_err(plain, ref, test), _rel_err(smoothed, ref, test)
    assert e_sq < 0.5 * e_plain, (e_sq, e_plain)


def test_padding_rows_are_ignored() -> None:
    x = outlier_input(10, seed=1)
    weight = torch.ones(2, 10)
    weight[1, 6:] = 0.0  # padding at the end of the second sequence
    garbage = x.clone()
    garbage[1, 6:] = 1e4 * torch.randn(4, 64)
    clean = x.clone()
    clean[1, 6:] = 0.0
    records = []
    for inp, w in ((garbage, weight), (clean, weight), (garbage, None)):
        algo = sq()
        algo.process_block(toy_ctx(toy_block(), [CachedCall((inp,), {}, w)]))
        records.append(algo.record.scales["toy.in"])
    assert torch.equal(records[0], records[1])  # what padding holds does not matter
    assert not torch.allclose(records[0], records[2])  # ... but it would if it were counted


def test_groups_sharing_a_producer_are_refused() -> None:
    """Folding into a norm read by two groups would change the other group's input: not exact."""
    ctx = toy_ctx(toy_block(), [CachedCall((outlier_input(8, seed=0),), {})])
    ctx.layout = BlockLayout(groups=(
        LayerGroup("a", ("fc1",), inspect="fc1", producer=Producer("norm", "norm")),
        LayerGroup("b", ("fc2",), inspect="fc2", producer=Producer("norm", "norm"))))
    with pytest.raises(ValueError, match=r"groups 'a' and 'b' both fold scales into norm"):
        sq().smooth(ctx)


def test_missing_act_is_a_config_error(tiny_model, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"quant\.act"):
        sq(act=False)
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl"))},
                        "quant": {"method": "SmoothQuant", "special": {"alpha": 0.5}},
                        "save": {"save_path": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=r"quant\.act.*act: \{bit: 8\}"):
        build_algorithms(cfg.quant)
    with pytest.raises(ConfigError, match="alpha"):
        build_algorithms(QuantConfig(method="SmoothQuant", act={"bit": 8}, special={"alpha": 1.5}))


# ------------------------------------------------------------------------ real block: exact folding
@pytest.fixture(scope="module")
def qwen_adapter(tiny_model):
    return load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")


@pytest.fixture(scope="module")
def qwen_batches(qwen_adapter, calib_dir):
    samples = load_samples("custom_mm", str(calib_dir), 4, seed=0)
    return [qwen_adapter.batch_process(g, with_answer=True, max_length=128) for g in batches(samples, 2)]


@pytest.mark.parametrize("part", ["language", "vision"])
def test_fold_without_quant_keeps_block_outputs(qwen_adapter, qwen_batches, part) -> None:
    calls = capture(qwen_adapter, part, qwen_batches, CPU)
    if part == "language":
        assert any((c.token_weight == 0).any() for c in calls), "the calibration batches should contain padding"
    block = qwen_adapter.blocks(part)[0]
    original = {k: v.clone() for k, v in block.state_dict().items()}
    try:
        prefix, layout = f"{qwen_adapter.blocks_path(part)}.0", qwen_adapter.block_layout(part, block)
        ctx = BlockContext(part=Part(part), index=0, prefix=prefix, block=block, layout=layout, calls=calls,
                           device=CPU, plan=plan_of_block(prefix, block, layout, lambda n: W8, part, act_bits=8))
        ref = ctx.run()
        scales = sq().smooth(ctx)
        out = ctx.run()
        changed = {k for k, v in block.state_dict().items() if not torch.allclose(v, original[k])}
    finally:
        block.load_state_dict(original)
    expected = {f"{prefix}.{g.name}" for g in ctx.layout.groups if g.producer is not None}
    assert set(scales) == expected and expected >= {f"{prefix}.attn_in", f"{prefix}.mlp_in"}
    assert max(float(s.log().abs().max()) for s in scales.values()) > 0.5
    producers = {f"{g.producer.name}.weight" for g in ctx.layout.groups if g.producer is not None}
    assert producers <= changed  # the fold really changed the weights
    for r, o in zip(ref, out):
        assert float((o - r).abs().max()) <= 1e-4 * float(r.abs().max()), part


# -------------------------------------------------------------------------------- CLI end to end
def _run_cli(tmp_path: Path, quant: dict, tiny: Path, calib: Path, save_trans: bool = True) -> Path:
    cfg = {"model": {"type": "qwen2_vl", "path": str(tiny), "dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(calib), "n_samples": 4, "bs": 2, "seq_len": 128},
           "quant": quant, "save": {"save_path": str(tmp_path / "out"), "save_trans": save_trans}}
    path = tmp_path / "job.yml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "LLMC_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "llmc", str(path)], cwd=REPO, env=env, capture_output=True, check=False,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp_path / "out"


W8A8 = {"method": "SmoothQuant", "weight": {"bit": 8, "symmetric": True, "granularity": "per_channel"},
        "act": {"bit": 8}}


@pytest.mark.parametrize("objects", [["language"], ["vision", "language"]])
def test_cli_end_to_end(tmp_path, tiny_model, calib_dir, qwen_adapter, qwen_batches, objects) -> None:
    tiny = tiny_model("qwen2_vl")
    out = _run_cli(tmp_path, {**W8A8, "quant_objects": objects, "special": {"alpha": 0.5}}, tiny, calib_dir)
    layers = load_plan(out / "quant_layers.json").settings()
    per_part = {"language": 2 * 7, "vision": 2 * 4}
    assert len(layers) == sum(per_part[p] for p in objects)
    assert set(layers.values()) == {"w8scha8"}
    assert {n.startswith("model.visual.") for n in layers} == ({True, False} if "vision" in objects else {False})
    assert "SmoothQuant on language" in (out / "llmc.log").read_text()
    # the saved transformed float model computes what the original does, with smoothed weights
    trans = load_adapter("qwen2_vl", str(out / "trans"), dtype="float32").model
    orig = qwen_adapter.model
    sd_t, sd_o = trans.state_dict(), orig.state_dict()
    changed = {k for k in sd_o if not torch.equal(sd_o[k], sd_t[k])}
    assert "model.language_model.layers.0.input_layernorm.weight" in changed
    assert ("model.visual.blocks.0.norm1.weight" in changed) == ("vision" in objects)
    with torch.no_grad():
        a, b = orig(**qwen_batches[0]).logits, trans(**qwen_batches[0]).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_example_config_parses(tiny_model, calib_dir, tmp_path) -> None:
    data = yaml.safe_load((REPO / "configs" / "smoothquant_w8a8.yml").read_text())
    data["model"]["path"], data["calib"]["path"] = str(tiny_model("qwen2_vl")), str(calib_dir)
    data["save"]["save_path"] = str(tmp_path / "out")
    (algo,) = build_algorithms(parse_config(data).quant)
    assert isinstance(algo, SmoothQuant) and algo.options.alpha == 0.5 and algo.quant.act.bit == 8


def test_missing_act_fails_before_the_model_is_loaded(tiny_model, tmp_path, monkeypatch) -> None:
    from llmc import runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before quant.act was checked")

    monkeypatch.setattr(runner, "load_adapter", no_load)
    cfg = parse_config({"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl"))},
                        "quant": {"method": "SmoothQuant"}, "save": {"save_path": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=r"quant\.act"):
        runner.run_job(cfg)
    assert not (tmp_path / "out").exists()
