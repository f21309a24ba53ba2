"""Batching of per-sample processor outputs: truncation that respects images, padding."""
from __future__ import annotations

import torch

# Keys whose tensors are per token: [1, T] (or [1, ..., T] for multi-axis position ids).
TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


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
    return out


def collate(encoded: list[dict[str, torch.Tensor]], pad_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad token-level tensors to the longest sample; concatenate the rest on dim 0."""
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
            padded = []
            for v in values:
                gap = longest - v.shape[-1]
                pad = torch.full((*v.shape[:-1], gap), fill, dtype=v.dtype)
                padded.append(torch.cat([pad, v] if padding_side == "left" else [v, pad], dim=-1))
            batch[key] = torch.cat(padded, dim=0)
        else:
            batch[key] = torch.cat(values, dim=0)
    if "attention_mask" not in batch:
        raise ValueError("the processor returned no attention_mask")
    return batch
