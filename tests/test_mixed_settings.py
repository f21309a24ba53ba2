"""Mixed quantization settings on tiny Qwen2-VL: per-part weights, overrides, skips, group-size checks.

Each job is RTN through ``run_job`` (no calibration needed); the adapter the job
quantized is caught on its way through ``llmc.runner.quantize_model`` so that
both the model's modules and the saved ``quant_layers.json`` can be inspected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import llmc
from llmc import runner
from llmc.config import ConfigError, parse_config
from llmc.plan import Part, load_plan, resolve_spec
from llmc.quant.fake_linear import FakeQuantLinear
from llmc.quant.primitives import QuantSpec, rtn_fake_quantize

REPO = Path(llmc.__file__).resolve().parent.parent
VISION = "model.visual.blocks"
LANGUAGE = "model.language_model.layers"
DEFAULT_W = {"bit": 4, "symmetric": False, "granularity": "per_group", "group_size": 32}
VISION_W = {"bit": 8, "symmetric": True, "granularity": "per_channel"}
N_LINEARS = {"vision": 2 * 4, "language": 2 * 7}  # tiny Qwen2-VL: 2 blocks each


def job(save: Path, model: Path, **quant: Any) -> dict[str, Any]:
    return {"model": {"type": "qwen2_vl", "path": str(model), "dtype": "float32"},
            "quant": {"method": "RTN", **quant}, "save": {"save_path": str(save)},
            "run": {"stream": False}}  # the in-memory model is inspected afterwards


def run(data: dict[str, Any]) -> tuple[nn.Module, dict[str, str]]:
    """Run the job; return the quantized model and the saved ``quant_layers.json``."""
    caught = {}
    real = runner.quantize_model

    def spy(cfg, adapter, device, **kw):
        caught["model"] = adapter.model
        return real(cfg, adapter, device, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "quantize_model", spy)
        out = runner.run_job(parse_config(data))
    return caught["model"], load_plan(out / "quant_layers.json").settings()


def linears(model: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if n.startswith(prefix) and isinstance(m, nn.Linear)}


def spec_of(d: dict[str, Any]) -> QuantSpec:
    return QuantSpec(d["bit"], d.get("symmetric", False), d.get("granularity", "per_group"),
                     d.get("group_size", 128))


def key(spec: QuantSpec | None) -> tuple | None:
    """What a spec means: the group size counts only for per-group granularity."""
    if spec is None:
        return None
    return (spec.bits, spec.symmetric, spec.granularity, spec.group_len(1 << 20))


def check_quantized(m: nn.Module, name: str, expected: QuantSpec) -> None:
    """``m`` is fake-quant with ``expected``, and its weight really is that RTN grid (hand reference)."""
    assert isinstance(m, FakeQuantLinear), f"{name} should be quantized"
    assert key(m.spec) == key(expected), f"{name}: {m.spec} != {expected}"
    with torch.no_grad():
        assert torch.equal(m.quantized_weight(), rtn_fake_quantize(m.weight, expected)), name


# ------------------------------------------------------------------- vision + language, mixed
@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    data = job(tmp_path_factory.mktemp("mixed") / "out", tiny_model("qwen2_vl"),
               quant_objects=["vision", "language"], weight=DEFAULT_W, vision={"weight": VISION_W},
               overrides=[{"pattern": "*.mlp.down_proj", "weight": {"bit": 8}},
                          {"pattern": f"{LANGUAGE}.1.self_attn.o_proj", "skip": True}],
               skip_layers=[f"{VISION}.1.mlp.*"])
    return run(data)


SKIPPED = {f"{LANGUAGE}.1.self_attn.o_proj", f"{VISION}.1.mlp.fc1", f"{VISION}.1.mlp.fc2"}


def test_vision_uses_part_settings_language_the_default(mixed) -> None:
    model, _ = mixed
    vis, lang = linears(model, VISION), linears(model, LANGUAGE)
    assert len(vis) == N_LINEARS["vision"] and len(lang) == N_LINEARS["language"]
    for name, m in vis.items():
        if name not in SKIPPED:
            check_quantized(m, name, spec_of(VISION_W))
    for name, m in lang.items():
        if name not in SKIPPED and not name.endswith("mlp.down_proj"):
            check_quantized(m, name, spec_of(DEFAULT_W))
    assert not isinstance(model.get_submodule("lm_head"), FakeQuantLinear)


def test_override_down_proj_to_8bit_there_only(mixed) -> None:
    model, _ = mixed
    downs = {n: m for n, m in linears(model, "model.").items() if n.endswith(".mlp.down_proj")}
    assert len(downs) == 2
    for name, m in downs.items():  # the override replaces `bit` only: the rest is the language default
        check_quantized(m, name, spec_of({**DEFAULT_W, "bit": 8}))
    others = [m for n, m in linears(model, "model.").items() if isinstance(m, FakeQuantLinear)
              and n not in downs and n.startswith(LANGUAGE)]
    assert others and all(m.spec.bits == 4 for m in others)


def test_skips_leave_plain_linears(mixed) -> None:
    model, layers = mixed
    for name in SKIPPED:
        m = model.get_submodule(name)
        assert type(m) is nn.Linear, f"{name} is {type(m).__name__}"
        assert name not in layers
    # the same linears in block 0 are quantized: the patterns matched only what they name
    for name in (f"{LANGUAGE}.0.self_attn.o_proj", f"{VISION}.0.mlp.fc1", f"{VISION}.0.mlp.fc2"):
        assert isinstance(model.get_submodule(name), FakeQuantLinear), name


def test_quant_layers_json_matches_the_model(mixed) -> None:
    model, layers = mixed
    fq = {n: m.layer.describe() for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    assert layers == fq
    assert len(layers) == N_LINEARS["vision"] + N_LINEARS["language"] - len(SKIPPED)
    assert layers[f"{VISION}.0.attn.qkv"] == "w8sch"
    assert layers[f"{LANGUAGE}.0.self_attn.q_proj"] == "w4ag32"
    assert layers[f"{LANGUAGE}.1.mlp.down_proj"] == "w8ag32"


# ------------------------------------------------------------------- vision only, part settings alone
def test_vision_part_weight_alone_with_vision_only(tiny_model, tmp_path) -> None:
    vision_w = {"bit": 8, "symmetric": False, "granularity": "per_group", "group_size": 16}
    model, layers = run(job(tmp_path / "out", tiny_model("qwen2_vl"), quant_objects=["vision"],
                            vision={"weight": vision_w}))
    vis = linears(model, VISION)
    for name, m in vis.items():
        check_quantized(m, name, spec_of(vision_w))
    assert not any(isinstance(m, FakeQuantLinear) for m in linears(model, LANGUAGE).values())
    assert set(layers) == set(vis) and set(layers.values()) == {"w8ag16"}


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("quant, layer", [
    ({"quant_objects": ["language"], "weight": {**DEFAULT_W, "group_size": 48}},
     f"{LANGUAGE}.0.self_attn.q_proj"),
    ({"quant_objects": ["vision", "language"], "weight": DEFAULT_W,
      "overrides": [{"pattern": "*.mlp.down_proj", "weight": {"group_size": 48}}]},
     f"{LANGUAGE}.0.mlp.down_proj"),
])
def test_bad_group_size_names_the_layer(tiny_model, tmp_path, quant, layer) -> None:
    with pytest.raises(ConfigError) as err:
        run(job(tmp_path / "out", tiny_model("qwen2_vl"), **quant))
    msg = str(err.value)
    assert "group_size=48" in msg and f"layer {layer};" in msg, msg
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------- per-part override of one key
def test_part_override_of_bit_only_keeps_the_other_keys(tiny_model, tmp_path) -> None:
    cfg = parse_config(job(tmp_path / "out", tiny_model("qwen2_vl"), quant_objects=["vision", "language"],
                           weight={"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32},
                           vision={"weight": {"bit": 8}}))
    def resolve(name, part):
        return resolve_spec(cfg.quant, name, Part(part))
    assert key(resolve(f"{VISION}.0.attn.qkv", "vision")) == key(QuantSpec(8, True, "per_group", 32))
    assert key(resolve(f"{LANGUAGE}.0.mlp.up_proj", "language")) == key(QuantSpec(4, True, "per_group", 32))
    model, layers = run(job(tmp_path / "run", tiny_model("qwen2_vl"), quant_objects=["vision", "language"],
                            weight={"bit": 4, "symmetric": True, "granularity": "per_group", "group_size": 32},
                            vision={"weight": {"bit": 8}}))
    check_quantized(model.get_submodule(f"{VISION}.0.attn.qkv"), "qkv", QuantSpec(8, True, "per_group", 32))
    assert layers[f"{VISION}.1.mlp.fc2"] == "w8sg32"


# ------------------------------------------------------------------- the example config
def test_example_config_resolves_as_documented(tiny_model, tmp_path) -> None:
    data = yaml.safe_load((REPO / "configs" / "mixed_vision_language.yml").read_text())
    data["model"]["path"] = str(tiny_model("qwen2_vl"))
    data["save"]["save_path"] = str(tmp_path / "out")
    data.pop("calib", None)
    quant = parse_config(data).quant

    def resolve(name, part):
        return resolve_spec(quant, name, Part(part), ("lm_head",))
    assert key(resolve(f"{VISION}.0.attn.qkv", "vision")) == key(QuantSpec(8, True, "per_channel", 128))
    assert key(resolve(f"{LANGUAGE}.0.self_attn.q_proj", "language")) == key(QuantSpec(4, False, "per_group", 32))
    assert key(resolve(f"{LANGUAGE}.1.mlp.down_proj", "language")) == key(QuantSpec(8, False, "per_group", 32))
    assert key(resolve(f"{LANGUAGE}.0.self_attn.o_proj", "language")) == key(QuantSpec(4, False, "per_group", 32))
    assert resolve(f"{VISION}.0.mlp.fc2", "vision") is None
    assert resolve("lm_head", "language") is None
