"""Batching of per-sample processor outputs: truncation that respects images, padding.

Token-level tensors are padded on the requested side. Everything else is concatenated on dim 0;
when samples differ in dim 1 (a tile or image count) that dim is zero-padded at its end to the
largest count first (any other difference is an error), so that such samples batch together:

* Idefics3 / SmolVLM ``pixel_values`` ``[1, tiles, 3, H, W]`` and ``pixel_attention_mask``
  ``[1, tiles, H, W]``: the model drops all-zero images (``real_images_inds``), and a zero
  attention mask is what the processor itself pads with;
* LLaVA-NeXT / OneVision ``pixel_values`` ``[1, tiles, 3, H, W]``: the model keeps the first
  ``image_size_to_num_patches(image_sizes[i])`` tiles of each sample, padded tiles are ignored;
* Mllama ``aspect_ratio_ids`` ``[1, images]`` (0 = no image), ``aspect_ratio_mask`` and
  ``pixel_values`` (``[1, images, tiles, ...]``): zero is the processor's own padding.

Mllama's ``cross_attention_mask`` ``[1, T, images, tiles]`` is per token on dim 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Keys whose tensors are per token: [1, T] (or [1, ..., T] for multi-axis position ids).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
# Keys whose tensors are per token on dim 1: [1, T, ...].
TOKEN_DIM1_KEYS = ("cross_attention_mask",)


def truncate(enc: dict[str, torch.Tensor], max_length: int, image_mask: torch.Tensor,
             index: int) -> dict[str, torch.Tensor]:
    """Cut a single sample to ``max_length`` tokens; refuse to cut image tokens."""
    length = enc["input_ids"].shape[-1]
    if length <= max_length:
        return enc
    if image_mask[..., max_length:].any():
        n_img = int(image_mask.sum())
        raise ValueError(
            f"sample {index}: seq_len={max_length} would cut its image tokens (the sample has {length} "
            f"tokens, {n_img} of them image tokens); raise calib.seq_len to at least {length} "
            f"or use smaller images")
    out = dict(enc)
    for key in TOKEN_KEYS:
        if key in out:
            out[key] = out[key][..., :max_length]
    for key in TOKEN_DIM1_KEYS:
        if key in out:
            out[key] = out[key][:, :max_length]
    return out


def pad_count_dim(v: torch.Tensor, shape: tuple[int, ...], dim: int, key: str) -> torch.Tensor:
    """Zero-pad ``v``'s count axis ``dim`` (tiles, images) at its end to ``shape[dim]``; other dims must agree."""
    bad = [d for d in range(1, v.dim()) if d != dim and v.shape[d] != shape[d]]
    if v.dim() != len(shape) or bad:
        raise ValueError(f"{key}: cannot batch samples of shapes {tuple(v.shape)} and {shape} "
                         f"(only dim {dim}, a tile/image count, may differ)")
    gap = shape[dim] - v.shape[dim]
    if gap == 0:
        return v
    pads = [0, 0] * (v.dim() - 1 - dim) + [0, gap]
    return F.pad(v, pads)


def _pad_tokens(v: torch.Tensor, dim: int, longest: int, fill: int, side: str) -> torch.Tensor:
    gap = longest - v.shape[dim]
    if gap == 0:
        return v
    pad_shape = list(v.shape)
    pad_shape[dim] = gap
    pad = torch.full(pad_shape, fill, dtype=v.dtype)
    return torch.cat([pad, v] if side == "left" else [v, pad], dim=dim)


def _max_shape(values: list[torch.Tensor]) -> tuple[int, ...]:
    if len({v.dim() for v in values}) != 1:
        raise ValueError(f"cannot batch tensors of shapes {[tuple(v.shape) for v in values]}")
    return tuple(max(v.shape[d] for v in values) for d in range(values[0].dim()))


def collate(encoded: list[dict[str, torch.Tensor]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token-level tensors to the longest sample; zero-pad and concatenate the rest on dim 0."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side={padding_side!r}; valid: ['left', 'right']")
    longest = max(e["input_ids"].shape[-1] for e in encoded)
    batch: dict[str, torch.Tensor] = {}
    for key in encoded[0]:
        values = [e[key] for e in encoded if e.get(key) is not None]
        if not values or not isinstance(values[0], torch.Tensor):
            continue
        if key in TOKEN_KEYS:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat([_pad_tokens(v, v.dim() - 1, longest, fill, padding_side) for v in values])
        elif key in TOKEN_DIM1_KEYS:
            values = [_pad_tokens(v, 1, longest, 0, padding_side) for v in values]
            shape = _max_shape(values)
            batch[key] = torch.cat([pad_count_dim(v, shape, 2, key) for v in values])
        elif values[0].dim() >= 2 and len({v.shape[1] for v in values}) > 1:
            shape = _max_shape(values)
            batch[key] = torch.cat([pad_count_dim(v, shape, 1, key) for v in values])
        else:
            batch[key] = torch.cat(values, dim=0)
    if "attention_mask" not in batch:
        raise ValueError("the processor returned no attention_mask")
    return batch
