"""Fidelity vs the float model: 0 / 1 against itself, > 0 after RTN W2, equal to a plain per-sample computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmc.calib import load_samples
from llmc.calib.sample import Sample
from llmc.config import parse_config
from llmc.data.mme_synth import generate as make_mme
from llmc.eval.fidelity import check_held_out, collect_reference, fidelity
from llmc.models import load_adapter
from llmc.runner import quantize_model


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> list[Sample]:
    """Samples of the mme_synth *test* split (the calibration data is the calib split)."""
    root = make_mme(tmp_path_factory.mktemp("fid") / "test", "test", n_images=3, seed=1)
    return load_samples("custom_mm", root, 6)


@pytest.fixture()
def adapter(tiny_model):
    return load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")


def rtn_w2(adapter, model_dir, calib_dir, tmp_path) -> None:
    cfg = parse_config({
        "model": {"type": "qwen2_vl", "path": str(model_dir), "dtype": "float32"},
        "calib": {"name": "custom_mm", "path": str(calib_dir)},
        "quant": {"method": "RTN", "quant_objects": ["vision", "language"],
                  "weight": {"bit": 2, "group_size": 32}},
        "save": {"save_path": str(tmp_path / "unused")},
    })
    quantize_model(cfg, adapter, torch.device("cpu"))


@torch.no_grad()
def plain_kl_top1(ref_adapter, adapter, samples) -> tuple[float, float]:
    """One sample at a time, no padding, full logits: mean KL and top-1 agreement over answer positions."""
    kls, agree = [], []
    for s in samples:
        full = ref_adapter.batch_process([s], with_answer=True)
        p = ref_adapter.encode(s, with_answer=False)["input_ids"].shape[-1]
        lf = ref_adapter.model(**full).logits[0, p - 1:-1].log_softmax(-1)
        lq = adapter.model(**full).logits[0, p - 1:-1].log_softmax(-1)
        kls.append(F.kl_div(lq, lf, log_target=True, reduction="none").sum(-1))
        agree.append(lf.argmax(-1) == lq.argmax(-1))
    return float(torch.cat(kls).mean()), float(torch.cat(agree).float().mean())


def test_model_against_itself(adapter, held_out):
    ref = collect_reference(adapter, held_out, bs=4, max_new_tokens=4)
    assert [lp.shape[0] for lp in ref.log_probs] == [3] * 6  # "Yes"/"No" + <|im_end|> + "\n"
    m = fidelity(adapter, ref)
    assert m["kl"] == 0.0 and m["top1_agreement"] == 1.0 and m["answer_agreement"] == 1.0
    assert (m["n_samples"], m["n_positions"]) == (6, 18)


def test_rtn_w2_diverges_and_matches_plain_computation(adapter, held_out, tiny_model, calib_dir, tmp_path):
    model_dir = tiny_model("qwen2_vl")
    ref = collect_reference(adapter, held_out, bs=4, max_new_tokens=4)  # bs 4: padded batches
    rtn_w2(adapter, model_dir, calib_dir, tmp_path)
    m = fidelity(adapter, ref)
    assert m["kl"] > 1e-4
    float_adapter = load_adapter("qwen2_vl", str(model_dir), dtype="float32")
    kl, top1 = plain_kl_top1(float_adapter, adapter, held_out)
    assert m["kl"] == pytest.approx(kl, rel=1e-3)
    assert m["top1_agreement"] == pytest.approx(top1)


def test_calibration_samples_are_refused(held_out, calib_dir):
    calib = load_samples("custom_mm", calib_dir, 4)
    check_held_out(held_out, calib)  # disjoint splits
    with pytest.raises(ValueError, match="calibration samples"):
        check_held_out(held_out[:2] + calib[:1], calib)


def test_samples_need_answers(adapter, held_out):
    with pytest.raises(ValueError, match="no answer"):
        collect_reference(adapter, [Sample(held_out[0].question, held_out[0].images)])
