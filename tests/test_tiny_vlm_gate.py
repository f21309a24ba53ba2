"""The regression gate of every algorithm change: the shipped tiny VLM on mme_synth, before and after.

The shipped model (``builtin:tiny_vlm``, docs/tiny_vlm.md) must score >= 160 per category on average in
float on the categories it learned, and W4A16 AWQ / GPTQ (vision + language) must keep >= 95 % of it.
The benchmark must also tell bad quantization from good: W2 RTN collapses it, and at W3 RTN loses
clearly more than AWQ.
"""
from __future__ import annotations

import pytest
import torch

from llmc.builtin import resolve_builtin
from llmc.config import EvalConfig, parse_config
from llmc.eval.run import evaluate_position
from llmc.models import load_adapter
from llmc.runner import quantize_model

CATEGORIES = ["existence", "count", "color", "OCR"]  # position / numerical_calculation did not learn


@pytest.fixture(scope="module")
def data():
    return resolve_builtin("builtin:tiny_vlm"), resolve_builtin("builtin:mme_synth/calib"), \
        resolve_builtin("builtin:mme_synth/test")


def score(adapter, test) -> dict[str, float]:
    ev = EvalConfig(eval_pos=["pretrain"], name="mme_synth", path=test, bs=32, max_new_tokens=4,
                    categories=CATEGORIES, fidelity_samples=0)
    res = next(iter(evaluate_position(adapter, ev, "gate")["tasks"].values()))
    assert set(res["categories"]) == set(CATEGORIES) and res["n_questions"] == 400
    return res["categories"]


@pytest.fixture(scope="module")
def float_scores(data):
    model, _, test = data
    return score(load_adapter("qwen2_vl", model, dtype="float32"), test)


def test_float_model_scores_at_least_160(float_scores):
    mean = sum(float_scores.values()) / len(float_scores)
    assert mean >= 160, float_scores


def quantized_scores(data, method: str, bits: int, tmp_path) -> dict[str, float]:
    """``method`` W``bits`` (group 32, vision + language) on the shipped model, then scored."""
    model, calib, test = data
    cfg = parse_config({
        "model": {"type": "qwen2_vl", "path": model, "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": calib, "n_samples": 64, "bs": 8, "seq_len": 256},
        "quant": {"method": method, "quant_objects": ["vision", "language"],
                  "weight": {"bit": bits, "group_size": 32}},
        "save": {"save_path": str(tmp_path / "out")},
    })
    adapter = load_adapter("qwen2_vl", model, dtype="float32")
    quantize_model(cfg, adapter, torch.device("cpu"))
    return score(adapter, test)


def recovery(quant: dict[str, float], ref: dict[str, float]) -> float:
    return sum(quant.values()) / sum(ref.values())


@pytest.mark.parametrize("method", ["AWQ", "GPTQ"])
def test_w4a16_recovers_95_percent(data, float_scores, method, tmp_path):
    quant = quantized_scores(data, method, 4, tmp_path)
    assert recovery(quant, float_scores) >= 0.95, (method, float_scores, quant)


def test_w2_rtn_collapses(data, float_scores, tmp_path):
    quant = quantized_scores(data, "RTN", 2, tmp_path)
    assert recovery(quant, float_scores) <= 0.6, (float_scores, quant)


def test_w3_tells_awq_from_rtn(data, float_scores, tmp_path):
    rtn, awq = quantized_scores(data, "RTN", 3, tmp_path), quantized_scores(data, "AWQ", 3, tmp_path)
    assert recovery(awq, float_scores) >= 0.95 and recovery(rtn, float_scores) <= 0.9, (float_scores, rtn, awq)
