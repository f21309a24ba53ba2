"""Tests for llmc.testing.tiny_models: tiny real checkpoints built offline, loaded the user's way."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from llmc.testing import tiny_models as tm
from llmc.testing.tiny_models import (
    FAMILIES,
    VLM_FAMILIES,
    build_tiny_model,
    ensure_tiny_model,
    tiny_image,
)

torch.set_num_threads(1)

QUESTIONS = ["Is there a red circle?", "How many squares are on the left of the picture?"]


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def built(tiny_root: Path) -> dict[str, Path]:
    """Every family built once per session."""
    return {family: build_tiny_model(family, tiny_root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def image(tiny_root: Path) -> Image.Image:
    return Image.open(tiny_image(tiny_root / "img.png")).convert("RGB")


def _vlm_inputs(folder: Path, image: Image.Image):
    processor = AutoProcessor.from_pretrained(folder)
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    inputs = processor(text=texts, images=[image, image], return_tensors="pt", padding=True)
    return processor, processor.tokenizer, inputs


def _text_inputs(folder: Path):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    return tokenizer, tokenizer(texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_forward_generate(family: str, built: dict[str, Path], image: Image.Image) -> None:
    folder = built[family]
    if family in VLM_FAMILIES:
        model = AutoModelForImageTextToText.from_pretrained(folder)
        _, tokenizer, inputs = _vlm_inputs(folder, image)
        n_image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
        assert n_image_tokens.tolist() == [tm.IMAGE_TOKENS_PER_56PX_IMAGE] * 2
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer, inputs = _text_inputs(folder)
    model.eval()
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id is not None
    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and not bool(mask.all()), "the two prompts should need padding"
    vocab = model.config.get_text_config().vocab_size
    assert vocab == len(tokenizer)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (2, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt_len < out.shape[1] <= prompt_len + 3


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_shape_and_size(family: str, built: dict[str, Path]) -> None:
    folder = built[family]
    assert (folder / "model.safetensors").stat().st_size < 2_000_000
    weights = load_file(folder / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())
    auto = AutoModelForImageTextToText if family in VLM_FAMILIES else AutoModelForCausalLM
    model = auto.from_pretrained(folder)
    text = model.config.get_text_config()
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (64, 128, 2)
    assert text.num_attention_heads == 4 and text.max_position_embeddings == 512
    gqa = family in ("qwen2_5_vl", "llava_siglip_qwen2", "qwen2")
    assert text.num_key_value_heads == (2 if gqa else 4)
    assert model.config.tie_word_embeddings == (family in ("qwen2_vl", "qwen2"))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.in_features % 32 == 0 for m in linears)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_chat_template_and_image_placeholder(family: str, built: dict[str, Path]) -> None:
    processor = AutoProcessor.from_pretrained(built[family])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert QUESTIONS[0] in prompt and processor.image_token in prompt
    expected_end = "ASSISTANT:" if family == "llava_clip_llama" else "<|im_start|>assistant\n"
    assert prompt.endswith(expected_end)


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_weights(family: str, built: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_model(family, tmp_path / "again", seed=0)
    other = build_tiny_model(family, tmp_path / "other", seed=1)
    ref = load_file(built[family] / "model.safetensors")
    same, diff = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert ref.keys() == same.keys() == diff.keys()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert any(not torch.equal(ref[k], diff[k]) for k in ref)
    assert (again / "tokenizer.json").read_text() == (built[family] / "tokenizer.json").read_text()


def test_unknown_family_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        build_tiny_model("gpt17", tmp_path / "x")
    assert all(family in str(info.value) for family in FAMILIES)
    with pytest.raises(ValueError, match="qwen2_vl"):
        ensure_tiny_model("gpt17", cache_dir=tmp_path)
    assert not (tmp_path / "x").exists()


def test_refuses_existing_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        build_tiny_model("qwen2", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["exists"]  # no temporary leftovers


def test_ensure_builds_once_and_uses_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    path = ensure_tiny_model("llama", seed=3)
    assert path == tmp_path / "cache" / "llama-s3" and (path / "config.json").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model("llama", cache_dir=tmp_path / "cache", seed=3) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_ensure_tolerates_concurrent_builder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             built: dict[str, Path]) -> None:
    """If another process publishes the folder while we build, ours is dropped and theirs is used."""
    target = tmp_path / "qwen2-s0"
    real_write = tm._write

    def racing_write(family: str, folder: Path, seed: int) -> None:
        real_write(family, folder, seed)
        real_write(family, target, seed)  # the "other process" wins the rename
        (target / "winner.txt").write_text("other")

    monkeypatch.setattr(tm, "_write", racing_write)
    assert ensure_tiny_model("qwen2", cache_dir=tmp_path) == target
    assert (target / "winner.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen2-s0"]


def test_tiny_image(tmp_path: Path) -> None:
    path = tiny_image(tmp_path / "sub" / "a.png", size=(64, 48), seed=5)
    img = Image.open(path)
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (64, 48)
    assert len(img.getcolors(maxcolors=64 * 48)) >= 2
    assert tiny_image(tmp_path / "b.png", size=(64, 48), seed=5).read_bytes() == path.read_bytes()
