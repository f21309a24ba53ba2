"""``model.type: auto`` finds the same parts as the explicit adapters, refuses precisely, and `llmc inspect`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from llmc.models import load_adapter
from llmc.models.auto import AutoDiscoveryError
from llmc.models.discover import discover
from llmc.models.inspect import build_meta_model, inspect_report, skeleton
from llmc.testing.tiny_vila import vila_package

REPO = Path(__file__).resolve().parents[1]
# tiny family -> explicit model.type, for the families auto handles (the table in docs/add_model.md)
HANDLED = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "llava_clip_llama": "llava",
           "llava_siglip_qwen2": "llava", "internvl": "internvl", "idefics3": "idefics3", "llava_next": "llava_next",
           "llava_onevision": "llava_onevision", "llama": "llama", "qwen2": "qwen2", "vila_tiny": "vila",
           "paligemma": "paligemma", "mistral3": "mistral3"}
# tiny family -> what the refusal names
REFUSED = {"gemma3": ["4 norms", "post_feedforward_layernorm", "no nn.Linear with out_features == text hidden size 64",
                      "mm_input_projection_weight"],
           "qwen3_vl": ["model.visual.deepstack_merger_list", "deepstack", "between_blocks"],
           "mllama": ["model.vision_model.global_transformer.layers"]}


@pytest.fixture(scope="module", autouse=True)
def _register_vila():
    vila_package()


@pytest.mark.parametrize("family", HANDLED)
def test_auto_matches_explicit_adapter(family, tiny_model):
    path = str(tiny_model(family))
    explicit = load_adapter(HANDLED[family], path, dtype="float32")
    auto = load_adapter("auto", path, dtype="float32")
    assert auto.is_vlm == explicit.is_vlm
    assert auto.model_parts == explicit.model_parts
    assert auto.available_parts() == explicit.available_parts()
    for part in explicit.available_parts():
        blocks = explicit.blocks(part)
        assert auto.blocks(part) is auto.model.get_submodule(explicit.blocks_path(part))
        for i, block in enumerate(blocks):
            assert auto.block_layout(part, auto.blocks(part)[i]) == explicit.block_layout(part, block)
            assert auto.block_kind(part, i) == explicit.block_kind(part, i)
            assert auto.kwargs_source(part, i) == explicit.kwargs_source(part, i)
    assert auto.rotation_targets() == explicit.rotation_targets()
    assert auto.image_token_id() == explicit.image_token_id()


def test_qwen2_5_vl_window_and_full_attention_kinds(tiny_model):
    """The control for block kinds: Qwen2.5-VL's vision block 1 attends over whole images, block 0 over windows."""
    auto = load_adapter("auto", str(tiny_model("qwen2_5_vl")), dtype="float32")
    assert [auto.block_kind("vision", i) for i in range(2)] == [False, True]
    assert [auto.kwargs_source("vision", i) for i in range(2)] == [0, 1]


@pytest.mark.parametrize("family", REFUSED)
def test_auto_refuses_with_a_precise_message(family, tiny_model):
    with pytest.raises(AutoDiscoveryError) as info:
        load_adapter("auto", str(tiny_model(family)), dtype="float32")
    for needle in REFUSED[family]:
        assert needle in str(info.value)
    assert "python -m llmc inspect" in str(info.value)


def test_missing_parts_are_named():
    """A model whose parts carry unknown names: every missing part is reported, nothing is guessed."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer, self.ln = nn.Linear(8, 8), nn.LayerNorm(8)

    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.blocks, self.head = nn.Embedding(10, 8), nn.ModuleList([Block(), Block()]), nn.Linear(8, 10)
            self.eye = nn.Module()

        def get_input_embeddings(self):
            return self.emb

        def get_output_embeddings(self):
            return self.head

    problems = "\n".join(discover(Toy(), is_vlm=True).problems)
    for needle in ("blocks.0: no attention child", "blocks.0: no MLP child", "final norm: none of",
                   "vision tower: no module named any of"):
        assert needle in problems


def test_skeleton_is_a_working_adapter(tiny_model):
    """The skeleton printed by `inspect` compiles and gives the explicit adapter's layouts."""
    path = tiny_model("llava_siglip_qwen2")
    meta, is_vlm = build_meta_model(path)
    source = skeleton(discover(meta, is_vlm), is_vlm, name="SkeletonLlava")
    namespace: dict = {}
    exec(compile(source, "<skeleton>", "exec"), namespace)  # registers model.type skeletonllava
    made = load_adapter("skeletonllava", str(path), dtype="float32")
    explicit = load_adapter("llava", str(path), dtype="float32")
    assert made.model_parts == explicit.model_parts and made.rotation_targets() == explicit.rotation_targets()
    for part in explicit.available_parts():
        assert made.block_layout(part, made.blocks(part)[0]) == explicit.block_layout(part, explicit.blocks(part)[0])


def _inspect(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    return subprocess.run([sys.executable, "-m", "llmc", "inspect", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_inspect_cli(tiny_model, tmp_path):
    ok = _inspect([str(tiny_model("llava_next"))], tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    for needle in ("layers: ModuleList x 2 of LlamaDecoderLayer", "projector_writer model.multi_modal_projector.linear_2",
                   "image_newline", "model.type: auto handles this model", "class MyVLMAdapter(ModelAdapter)"):
        assert needle in ok.stdout
    refused = _inspect([str(tiny_model("qwen3_vl"))], tmp_path)
    assert refused.returncode == 3 and "deepstack_merger_list" in refused.stdout
    vila = tiny_model("vila_tiny")
    assert _inspect([str(vila)], tmp_path).returncode == 2  # its code runs only when asked
    remote = _inspect([str(vila), "--trust-remote-code"], tmp_path)
    assert remote.returncode == 0 and "projector_writer mm_projector.layers.2" in remote.stdout


def test_inspect_report_reads_no_weights(tiny_model):
    report, handled = inspect_report(tiny_model("qwen2"))
    assert handled and "text-only" in report and "vision_tower" not in report.split("## Found")[1].split("##")[0]
    meta, _ = build_meta_model(tiny_model("qwen2"))
    assert all(p.device == torch.device("meta") for p in meta.parameters())
