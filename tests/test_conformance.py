"""One conformance suite, run against every adapter on a tiny real checkpoint of its family."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from llmc.calib import load_samples
from llmc.models import load_adapter

FAMILIES = {  # tiny family -> model.type
    "qwen2_vl": "qwen2_vl",
    "qwen2_5_vl": "qwen2_5_vl",
    "llava_clip_llama": "llava",
    "llava_siglip_qwen2": "llava",
    "llama": "llama",
    "qwen2": "qwen2",
    "internvl": "internvl",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
    "gemma3": "gemma3",
    "qwen3_vl": "qwen3_vl",
    "llava_next": "llava_next",
    "llava_onevision": "llava_onevision",
    "mllama": "mllama",
    "paligemma": "paligemma",
    "mistral3": "mistral3",
    "vila_tiny": "vila",  # defined outside transformers (examples/vila_tiny)
}
# families whose parts model.type auto finds on its own (tests/test_auto_adapter.py: the same as explicit)
AUTO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_clip_llama", "llava_siglip_qwen2", "internvl", "idefics3",
                 "llava_next", "llava_onevision", "llama", "qwen2", "vila_tiny", "paligemma", "mistral3")
# model.type -> why rotation_targets() refuses (the adapter raises a ValueError naming it)
ROTATION_UNSUPPORTED: dict[str, str] = {}
# model.type -> why the Rotation algorithm refuses the (complete) targets: named in its error
ROTATION_REFUSED = {"gemma3": "post_attention_layernorm"}
# model types whose projector feeds cross-attention k/v, not the language residual stream
PROJECTOR_OUTSIDE_RESIDUAL = {"mllama"}
NEEDS = {"smolvlm": "num2words"}  # family -> package its real processor class requires


def _param(family: str, model_type: str):
    missing = NEEDS.get(family) and importlib.util.find_spec(NEEDS[family]) is None
    return pytest.param((family, model_type), id=family if model_type != "auto" else f"{family}-auto",
                        marks=pytest.mark.skipif(bool(missing), reason=f"needs {NEEDS.get(family)}"))


@pytest.fixture(scope="module", params=[_param(f, t) for f, t in FAMILIES.items()]
                + [_param(f, "auto") for f in AUTO_FAMILIES])
def adapter(request, tiny_model):
    family, model_type = request.param
    return load_adapter(model_type, str(tiny_model(family)), dtype="float32")


def _size(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[0]


def test_parts_found(adapter):
    assert isinstance(adapter.embed_tokens(), nn.Embedding)
    assert isinstance(adapter.lm_head(), nn.Linear)
    assert adapter.final_norm().weight.shape[0] == adapter.embed_tokens().embedding_dim
    assert isinstance(adapter.blocks("language"), nn.ModuleList) and len(adapter.blocks("language")) > 0
    if adapter.is_vlm:
        assert adapter.vision_tower() is not None and adapter.projector() is not None
        assert isinstance(adapter.blocks("vision"), nn.ModuleList) and len(adapter.blocks("vision")) > 0
        assert adapter.image_token_id() is not None
    else:
        assert adapter.available_parts() == ["language"]


def test_layout_covers_every_linear_once_with_consistent_shapes(adapter):
    for part in adapter.available_parts():
        for block in adapter.blocks(part):
            layout = adapter.block_layout(part, block)
            names = layout.linears()
            assert len(names) == len(set(names)), f"{part}: a linear is in two groups"
            linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
            assert set(names) == linears, f"{part}: groups miss {linears - set(names)}"
            for g in layout.groups:
                ins = {block.get_submodule(n).in_features for n in g.linears}
                assert len(ins) == 1, f"{g.name}: consumers disagree on in_features {ins}"
                block.get_submodule(g.inspect)
                if g.producer is not None:
                    prod = block.get_submodule(g.producer.name)
                    start, stop = g.producer.rows or (0, _size(prod))
                    assert stop - start == ins.pop(), f"{g.name}: producer width != consumer width"
                    assert g.producer.kind == ("linear" if isinstance(prod, nn.Linear) else "norm")
            for n in layout.residual_writers:
                assert n in names
            for n in layout.norms:
                assert not isinstance(block.get_submodule(n), nn.Linear)


def test_rotation_targets_include_the_projector(adapter):
    if adapter.model_type in ROTATION_UNSUPPORTED:
        with pytest.raises(ValueError, match=ROTATION_UNSUPPORTED[adapter.model_type]):
            adapter.rotation_targets()
        return
    t = adapter.rotation_targets()
    hidden = adapter.embed_tokens().embedding_dim
    for name in t.embeddings:
        assert isinstance(adapter.module(name), nn.Embedding)
    assert adapter.module(t.lm_head).in_features == hidden
    adapter.module(t.final_norm)
    if not adapter.is_vlm:
        return
    outside = [adapter.projector(), adapter.vision_tower(), adapter.model]  # raw weights may sit on the model
    written = []
    for name in t.external_writers:
        lin = adapter.module(name)
        assert isinstance(lin, nn.Linear) and lin.out_features == hidden
        assert any(m is lin for part in outside[:2] for m in part.modules()), f"{name} is not a vision-side module"
        written += list(lin.parameters())
    for name, how in t.external_weights:
        p = adapter.model.get_parameter(name)
        assert how in ("in_out", "row") and p.shape[-1] == hidden and p.dim() == (2 if how == "in_out" else 1)
        written.append(p)
    in_projector = any(p is q for p in written for q in adapter.projector().parameters())
    if adapter.model_type in PROJECTOR_OUTSIDE_RESIDUAL:
        assert not in_projector, "this projector feeds cross-attention k/v, not the residual stream"
    else:
        assert in_projector, "the projector's last writer lands in the residual stream"


def test_rotation_refusal_comes_from_the_layout(adapter):
    """Sandwich norms (BlockLayout.writer_norms) make the algorithm refuse, naming the norm."""
    layouts = [adapter.block_layout("language", b) for b in adapter.blocks("language")]
    if adapter.model_type not in ROTATION_REFUSED:
        assert not any(lay.writer_norms for lay in layouts)
        return
    from llmc.algorithms.rotation import Rotation
    from llmc.config import QuantConfig

    assert all(ROTATION_REFUSED[adapter.model_type] in lay.writer_norms for lay in layouts)
    with pytest.raises(ValueError, match=ROTATION_REFUSED[adapter.model_type]):
        Rotation(Rotation.Options(), QuantConfig()).prepare_model(adapter, torch.device("cpu"))


def test_batch_process_runs_forward_and_generate(adapter, calib_dir):
    samples = load_samples("custom_mm", calib_dir, 3)
    if not adapter.is_vlm:
        samples = [s.__class__(question=s.question, answer=s.answer) for s in samples]
    batch = adapter.batch_process(samples, with_answer=True, max_length=256)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    if adapter.is_vlm:
        n_img = adapter.image_token_mask(batch["input_ids"]).sum(dim=1)
        assert (n_img > 0).all(), "every sample carries its image tokens"
    with torch.no_grad():
        logits = adapter.model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    gen_batch = adapter.batch_process(samples[:2], with_answer=False, padding_side="left")
    out = adapter.model.generate(**gen_batch, max_new_tokens=3, do_sample=False)
    assert gen_batch["input_ids"].shape[1] < out.shape[1] <= gen_batch["input_ids"].shape[1] + 3


def test_truncation_never_cuts_image_tokens(adapter, calib_dir):
    if not adapter.is_vlm:
        pytest.skip("text-only")
    sample = load_samples("custom_mm", calib_dir, 1)[0]
    with pytest.raises(ValueError, match="would cut its image tokens"):
        adapter.batch_process([sample], max_length=3)
