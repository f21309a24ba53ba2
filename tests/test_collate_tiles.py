"""Batches of images with different tile counts: zero-padded tiles change nothing (Idefics3, LLaVA-NeXT)."""
from __future__ import annotations

import pytest
import torch

from llmc.calib.sample import Sample
from llmc.models import load_adapter
from llmc.models.collate import collate, pad_count_dim
from llmc.testing.tiny_models import tiny_image

# With the tiny processors a 56x56 and a 112x112 image tile alike (idefics3: 2x2 + global, llava_next:
# 2x2 + base); a 112x56 image gives 2x1 + 1 = 3 tiles, so the batch mixes 5 and 3 tiles.
SIZES = [(56, 56), (112, 56)]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiles")
    out = []
    for i, size in enumerate(SIZES):
        path = tiny_image(folder / f"{size[0]}x{size[1]}.png", size=size, seed=i)
        out.append(Sample(question=["What is shown?", "How many shapes are there in the image?"][i],
                          images=[str(path)], answer="A red circle."))
    return out


@pytest.mark.parametrize("family", ["idefics3", "llava_next"])
def test_mixed_tile_counts_batch_equals_per_sample(family, tiny_model, samples):
    adapter = load_adapter(family, str(tiny_model(family)), dtype="float32", attn_implementation="eager")
    singles = [adapter.batch_process([s]) for s in samples]
    tiles = [b["pixel_values"].shape[1] for b in singles]
    assert tiles[0] != tiles[1], f"the test needs different tile counts, got {tiles}"
    batch = adapter.batch_process(samples, padding_side="right")
    assert batch["pixel_values"].shape[1] == max(tiles)
    short = tiles.index(min(tiles))
    assert batch["pixel_values"][short, min(tiles):].abs().sum() == 0  # zero tiles appended
    with torch.no_grad():
        out = adapter.model(**batch, use_cache=False).logits
        for i, single in enumerate(singles):
            ref = adapter.model(**single, use_cache=False).logits[0]
            n = single["input_ids"].shape[1]
            assert bool(batch["attention_mask"][i, :n].all()) and not bool(batch["attention_mask"][i, n:].any())
            torch.testing.assert_close(out[i, :n], ref, atol=1e-4, rtol=1e-4)


def test_pad_count_dim_only_pads_counts():
    a = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "pixel_values": torch.ones(1, 2, 3, 4, 4), "image_sizes": torch.tensor([[4, 4]])}
    b = {**a, "pixel_values": torch.ones(1, 4, 3, 4, 4)}
    out = collate([a, b], pad_id=0)
    assert out["pixel_values"].shape == (2, 4, 3, 4, 4)
    assert out["pixel_values"][0, 2:].abs().sum() == 0 and out["pixel_values"][0, :2].min() == 1
    with pytest.raises(ValueError, match="only dim 1"):
        pad_count_dim(torch.ones(1, 2, 3, 4, 5), (1, 4, 3, 4, 4), 1, "pixel_values")


def test_cross_attention_mask_is_padded_per_token():
    """Mllama's cross_attention_mask [1, T, images, tiles] pads its token axis on the padding side."""
    a = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "cross_attention_mask": torch.ones(1, 2, 1, 2, dtype=torch.long)}
    b = {"input_ids": torch.ones(1, 3, dtype=torch.long), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "cross_attention_mask": torch.ones(1, 3, 2, 2, dtype=torch.long)}
    left = collate([a, b], pad_id=0, padding_side="left")["cross_attention_mask"]
    assert left.shape == (2, 3, 2, 2)
    assert left[0, 0].sum() == 0 and left[0, 1:, 0].min() == 1 and left[0, :, 1].sum() == 0
