"""The ``llmc`` lmms-eval model through real lmms-eval (simple_evaluate) on local MME-format data."""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from lmms_eval.tasks.mme import utils as mme_utils
from lmms_eval.utils import load_yaml_config
from PIL import Image

from llmc.calib import load_samples
from llmc.calib.sample import Sample
from llmc.config import EvalConfig
from llmc.data.mme_synth import CATEGORIES as SYNTH_CATEGORIES
from llmc.data.mme_synth import generate as make_mme_synth
from llmc.eval import lmms_wrapper
from llmc.eval.generation import encode_batch, generate
from llmc.eval.lmms_wrapper import LLMCLMM
from llmc.eval.mme_local import COGNITION, PERCEPTION, data_kind, prepare_task
from llmc.eval.run import evaluate_position, make_reference
from llmc.models import load_adapter
from llmc.strict import ConfigError

CATEGORIES = PERCEPTION + COGNITION
POST_PROMPT = "\nAnswer the question using a single word or phrase."


def png(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (56, 56), (10 * k, 200 - 10 * k, 90)).save(buf, format="PNG")
    return buf.getvalue()


def mme_rows() -> list[dict]:
    """All 14 real MME categories, one image each with a Yes ("green") / No ("red") pair."""
    rows = []
    for k, c in enumerate(CATEGORIES):
        for ans, word in (("Yes", "green"), ("No", "red")):
            rows.append({"question_id": f"{c}/{k:04d}.png", "image": {"bytes": png(k), "path": None},
                         "question": f"Is the image mostly {word}? Please answer yes or no.",
                         "answer": ans, "category": c})
    return rows


def hf_dataset() -> datasets.Dataset:
    feats = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                               "question": datasets.Value("string"), "answer": datasets.Value("string"),
                               "category": datasets.Value("string")})
    return datasets.Dataset.from_list(mme_rows(), features=feats)


@pytest.fixture(scope="module")
def mme_data(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("mme_data")
    datasets.DatasetDict({"test": hf_dataset()}).save_to_disk(str(root / "saved"))
    (root / "hf_parquet").mkdir()
    hf_dataset().to_parquet(str(root / "hf_parquet" / "test-00000-of-00001.parquet"))
    pq.write_table(pa.Table.from_pylist(mme_rows()), root / "plain.parquet")  # no HF metadata: image is a struct
    synth = make_mme_synth(root / "synth", "test", n_images=6, seed=0)
    return {"saved": root / "saved", "hf_parquet": root / "hf_parquet", "plain": root / "plain.parquet",
            "synth": synth}


@pytest.fixture(scope="module")
def qwen(tiny_model):
    return load_adapter("qwen2_vl", str(tiny_model("qwen2_vl")), dtype="float32")


@pytest.mark.parametrize("fmt, kind", [("saved", "datasets"), ("hf_parquet", "parquet"), ("plain", "parquet")])
def test_prepare_task_every_format(mme_data, tmp_path, fmt, kind):
    assert data_kind(mme_data[fmt]) == kind
    task = prepare_task(mme_data[fmt], tmp_path / "t")
    assert task.name == "mme_local" and task.n_questions == 28
    ds = datasets.load_from_disk(str(task.data_dir))["test"]
    ref = mme_rows()
    assert ds["question_id"] == [r["question_id"] for r in ref] and ds["answer"] == [r["answer"] for r in ref]
    assert ds[5]["image"].convert("RGB").tobytes() == Image.open(io.BytesIO(png(2))).convert("RGB").tobytes()
    cfg = load_yaml_config(str(task.include_dir / "mme_local.yaml"))  # as lmms-eval reads it
    assert cfg["dataset_kwargs"] == {"load_from_disk": True} and cfg["dataset_path"] == str(task.data_dir)
    assert cfg["process_results"] is mme_utils.mme_process_results
    assert cfg["metric_list"][0]["aggregation"] is mme_utils.mme_aggregate_results


def test_mme_synth_folder_is_named_mme_synth(mme_data, tmp_path):
    task = prepare_task(mme_data["synth"], tmp_path / "t", limit=5)
    assert task.name == "mme_synth" and task.n_questions == 4  # whole pairs only


def test_unknown_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not MME data"):
        data_kind(tmp_path)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        evaluate_position(None, EvalConfig(name="mme"), "pretrain")


def fake_generation(monkeypatch, answer) -> list:
    """Replace encoding + generation by ``answer(prompt)``; returns the list of seen (prompt, images)."""
    seen: list = []

    def encode(adapter, questions, images):
        seen.extend(zip(questions, images))
        return list(questions)

    monkeypatch.setattr(lmms_wrapper, "encode_batch", encode)
    monkeypatch.setattr(lmms_wrapper, "generate", lambda adapter, prompts, n: [answer(p) for p in prompts])
    return seen


@pytest.mark.parametrize("answer, per_cat", [
    (lambda p: "Yes", 50.0),
    (lambda p: "Yes" if "green" in p else "No", 200.0),
    (lambda p: "No." if "green" in p else "Yes", 0.0),
])
def test_known_answers_through_lmms_eval(monkeypatch, qwen, mme_data, tmp_path, answer, per_cat):
    seen = fake_generation(monkeypatch, answer)
    cfg = EvalConfig(name="mme", path=str(mme_data["saved"]), bs=5)
    res = evaluate_position(qwen, cfg, "pretrain", work_dir=tmp_path)
    t = res["tasks"]["mme_local"]
    assert t["categories"] == {c: per_cat for c in CATEGORIES} and t["n_questions"] == 28
    assert (t["perception"], t["cognition"]) == (10 * per_cat, 4 * per_cat)
    assert t["lmms_eval"]["mme_perception_score"] == t["perception"]
    assert t["lmms_eval"]["mme_cognition_score"] == t["cognition"]
    assert len(seen) == 28 and all(p.endswith(POST_PROMPT) and "Please answer" not in p for p, _ in seen)
    assert all(len(ims) == 1 and ims[0].size == (56, 56) for _, ims in seen)


def test_real_tiny_qwen2_vl_on_parquet(qwen, mme_data, tmp_path):
    cfg = EvalConfig(name="mme", path=str(mme_data["hf_parquet"]), bs=4, max_new_tokens=3)
    t = evaluate_position(qwen, cfg, "fake_quant", work_dir=tmp_path)["tasks"]["mme_local"]
    assert list(t["categories"]) == list(CATEGORIES) and t["n_questions"] == 28
    assert all(v in (0.0, 50.0, 100.0, 150.0, 200.0) for v in t["categories"].values())
    assert t["lmms_eval"]["mme_perception_score"] == pytest.approx(t["perception"])
    assert t["lmms_eval"]["mme_cognition_score"] == pytest.approx(t["cognition"])


def test_real_tiny_qwen2_vl_on_mme_synth(qwen, mme_data, tmp_path):
    cfg = EvalConfig(name="mme_synth", path=str(mme_data["synth"]), bs=3, max_new_tokens=3, limit=8)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    t = evaluate_position(qwen, cfg, "pretrain", work_dir=tmp_path)["tasks"]["mme_synth"]
    assert t["n_questions"] == 8 and set(t["categories"]) <= set(SYNTH_CATEGORIES) and len(t["categories"]) == 4
    assert torch.equal(torch.rand(3), expected)  # lmms-eval's seeding does not leak into the job


def test_missing_results_raise(monkeypatch, qwen, mme_data, tmp_path):
    import lmms_eval.evaluator

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", lambda **kw: {"results": {}})
    with pytest.raises(RuntimeError, match="no results"):
        evaluate_position(qwen, EvalConfig(name="mme_synth", path=str(mme_data["synth"])), "pretrain",
                          work_dir=tmp_path)


def test_encode_batch_equals_batch_process_on_paths(qwen, mme_data):
    paths = sorted((mme_data["synth"] / "images").glob("*.png"))[:3]
    qs = ["Is it red?", "Is there a blue square on the left?", "Count?"]
    ref = qwen.batch_process([Sample(q, (p,)) for q, p in zip(qs, paths)], with_answer=False, padding_side="left")
    got = encode_batch(qwen, qs, [[Image.open(p)] for p in paths])
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def requests(docs: list[dict], gen_kwargs: dict) -> list:
    visual = lambda d: [d["image"]]
    return [SimpleNamespace(args=(d["q"], dict(gen_kwargs), visual, i, "t", "test")) for i, d in enumerate(docs)]


def test_generate_until_batching_and_stops(tiny_model, mme_data):
    """Left-padded batches give the same tokens as one sample at a time (llava: non-trivial outputs)."""
    adapter = load_adapter("llava", str(tiny_model("llava_clip_llama")), dtype="float32")
    paths = sorted((mme_data["synth"] / "images").glob("*.png"))[:3]
    questions = ["Is it red?", "What is in the picture here?", "No"]
    docs = [{"q": q, "image": Image.open(p)} for q, p in zip(questions, paths)]
    single = [generate(adapter, adapter.batch_process([Sample(d["q"], (p,))], with_answer=False), 5)
              for d, p in zip(docs, paths)]
    for bs in (1, 3):
        lm = LLMCLMM(adapter=adapter, batch_size=bs)
        lm.task_dict = {"t": {"test": docs}}
        assert lm.generate_until(requests(docs, {"max_new_tokens": 5, "until": []})) == [s[0].strip() for s in single]
    assert len({s[0] for s in single}) > 1  # the outputs differ between prompts: the check has teeth
    stop = single[0][0][1]
    cut = lm.generate_until(requests(docs[:1], {"max_new_tokens": 5, "until": [stop]}))
    assert cut == [single[0][0].split(stop)[0].strip()] and cut[0] != single[0][0].strip()


def test_pretrained_folder_and_registration(tiny_model):
    from lmms_eval.models import get_model

    lm = LLMCLMM.create_from_arg_string(f"pretrained={tiny_model('qwen2_vl')},max_new_tokens=3",
                                        {"batch_size": "2", "device": "cpu"})
    assert lm.adapter.model_type == "qwen2_vl" and lm.batch_size == 2 and lm.max_new_tokens == 3
    lmms_wrapper.register()
    assert get_model("llmc") is LLMCLMM
    from llmc.eval.models import AVAILABLE_MODELS
    from llmc.eval.models.llmc import LLMCLMM as plugin_class

    assert AVAILABLE_MODELS == {"llmc": "LLMCLMM"} and plugin_class is LLMCLMM


def test_position_with_fidelity_reference(qwen, mme_data, tmp_path, calib_dir):
    cfg = EvalConfig(name="mme_synth", path=str(mme_data["synth"]), bs=4, max_new_tokens=2, limit=4,
                     fidelity_samples=4)
    calib = load_samples("custom_mm", calib_dir, 4)
    ref = make_reference(qwen, cfg, calibration=calib, work_dir=tmp_path)
    assert len(ref.samples) == 4 and {s.answer for s in ref.samples} == {"Yes", "No"}
    res = evaluate_position(qwen, cfg, "transformed", ref, work_dir=tmp_path)
    assert (res["fidelity"]["kl"], res["fidelity"]["top1_agreement"], res["fidelity"]["n_samples"]) == (0.0, 1.0, 4)
    assert "fidelity" not in evaluate_position(qwen, cfg, "pretrain", ref, work_dir=tmp_path)
    assert make_reference(qwen, EvalConfig(fidelity_samples=0)) is None
    with pytest.raises(ValueError, match="calibration samples"):  # evaluating on the calibration data itself
        make_reference(qwen, EvalConfig(name="mme_synth", path=str(calib_dir), fidelity_samples=4),
                       calibration=load_samples("custom_mm", calib_dir, 12), work_dir=tmp_path)


def test_real_mme_template_config(qwen, mme_data, calib_dir, tmp_path):
    """``configs/real_mme_awq_w4a16.yml`` with its three placeholders filled is a valid job whose eval
    section scores the local MME copy."""
    import yaml

    from llmc.config import parse_config

    repo = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((repo / "configs" / "real_mme_awq_w4a16.yml").read_text())
    assert {data["model"]["path"], data["calib"]["path"], data["eval"]["path"]} == {
        "/path/to/Qwen2-VL-2B-Instruct", "/path/to/calib", "/path/to/MME"}
    data["model"]["path"], data["calib"]["path"] = str(qwen.path), str(calib_dir)
    data["eval"].update(path=str(mme_data["hf_parquet"]), limit=4)
    data["save"]["save_path"] = str(tmp_path / "out")
    cfg = parse_config(data, root=repo / "configs")
    t = evaluate_position(qwen, cfg.eval, "pretrain", work_dir=tmp_path)["tasks"]["mme_local"]
    assert t["n_questions"] == 4 and len(t["categories"]) == 2
