"""Fast fidelity of a transformed / quantized model against its float self, on held-out samples.

Usage::

    reference = collect_reference(adapter, samples)   # float model, before quantization
    ...quantize...
    metrics = fidelity(adapter, reference)             # same adapter (or any with the same tokenizer)

Metrics, over the *answer positions* of each sample (the tokens after the prompt when
the sample is teacher-forced with its answer, chat-template end tokens included):

* ``kl``: mean over positions of KL(p_float || p_quant) of the next-token distribution (nats);
* ``top1_agreement``: fraction of positions where both models' most likely next token agree;
* ``answer_agreement``: fraction of samples whose greedy answers (``max_new_tokens``) are equal
  after normalization (case, surrounding spaces and final period).

Works on any model, trained or random. The samples must not be calibration samples:
:func:`check_held_out` refuses overlaps (same question and same image bytes).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from llmc.calib.datasets import batches
from llmc.calib.sample import Sample
from llmc.eval.generation import generate, model_device
from llmc.models.base import ModelAdapter

MAX_ANSWER_POSITIONS = 32

__all__ = ["Reference", "check_held_out", "collect_reference", "fidelity", "normalize_answer"]


@dataclass
class Reference:
    """What the float model said: answer-position log-probs (CPU, float32) and greedy answers."""

    samples: list[Sample]
    log_probs: list[torch.Tensor] = field(default_factory=list)  # per sample [positions, vocab]
    answers: list[str] = field(default_factory=list)
    bs: int = 4
    max_new_tokens: int = 8


def normalize_answer(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".").strip()


def _image_hash(path: Path) -> str:
    """Hash of the decoded pixels (a re-encoded copy of an image is the same image)."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        return hashlib.sha256(repr(rgb.size).encode() + rgb.tobytes()).hexdigest()


def _sample_key(s: Sample) -> tuple[str, tuple[str, ...]]:
    return s.question, tuple(_image_hash(Path(p)) for p in s.images)


def check_held_out(samples: Sequence[Sample], calibration: Sequence[Sample]) -> None:
    """Raise if a fidelity sample is also a calibration sample (same question, same image pixels)."""
    calib = {_sample_key(s) for s in calibration}
    overlap = [i for i, s in enumerate(samples) if _sample_key(s) in calib]
    if overlap:
        raise ValueError(f"fidelity samples {overlap[:5]} are calibration samples; use held-out data")


def _prompt_lengths(adapter: ModelAdapter, samples: Sequence[Sample], ids: torch.Tensor,
                    mask: torch.Tensor) -> list[int]:
    """Per sample, how many of its (left-padded) tokens belong to the prompt."""
    out = []
    for b, s in enumerate(samples):
        if s.answer is None:
            raise ValueError(f"fidelity sample {b} has no answer to teacher-force")
        prompt = adapter.encode(s, with_answer=False)["input_ids"][0]
        full = ids[b][mask[b].bool()]
        n = min(len(prompt), len(full))
        differ = (prompt[:n] != full[:n]).nonzero()
        out.append(int(differ[0]) if len(differ) else n)  # common prefix of prompt and prompt+answer
    return out


@torch.no_grad()
def answer_log_probs(adapter: ModelAdapter, samples: Sequence[Sample]) -> list[torch.Tensor]:
    """Log-softmax of the next-token logits at each sample's answer positions, ``[positions, vocab]``."""
    batch = adapter.batch_process(samples, with_answer=True, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    prompts = _prompt_lengths(adapter, samples, ids, mask)
    lengths = mask.sum(-1).tolist()
    answer_lens = [min(L - p, MAX_ANSWER_POSITIONS) for L, p in zip(lengths, prompts)]
    if min(answer_lens) < 1:
        raise ValueError("a fidelity sample has no answer tokens after its prompt")
    keep = max(answer_lens) + 1
    device = model_device(adapter.model)
    logits = adapter.model(**{k: v.to(device) for k, v in batch.items()}, logits_to_keep=keep).logits
    logits = logits[:, -keep:].float().log_softmax(-1).cpu()
    # with left padding every sample ends at the last position: its n answer tokens are the last n,
    # predicted by the n positions before the last one
    return [logits[b, keep - 1 - n: keep - 1] for b, n in enumerate(answer_lens)]


def _answers(adapter: ModelAdapter, samples: Sequence[Sample], bs: int, max_new_tokens: int) -> list[str]:
    out: list[str] = []
    for chunk in batches(list(samples), bs):
        out += generate(adapter, adapter.batch_process(chunk, with_answer=False, padding_side="left"), max_new_tokens)
    return out


@torch.no_grad()
def collect_reference(adapter: ModelAdapter, samples: Sequence[Sample], bs: int = 4,
                      max_new_tokens: int = 8) -> Reference:
    """Run the (float) model once on ``samples`` and keep what :func:`fidelity` compares against."""
    if not samples:
        raise ValueError("collect_reference: no samples")
    ref = Reference(samples=list(samples), bs=bs, max_new_tokens=max_new_tokens)
    for chunk in batches(list(samples), bs):
        ref.log_probs += answer_log_probs(adapter, chunk)
    ref.answers = _answers(adapter, samples, bs, max_new_tokens)
    return ref


@torch.no_grad()
def fidelity(adapter: ModelAdapter, reference: Reference) -> dict[str, float]:
    """KL, top-1 agreement and answer agreement of the adapter's current model vs ``reference``."""
    current: list[torch.Tensor] = []
    for chunk in batches(list(reference.samples), reference.bs):
        current += answer_log_probs(adapter, chunk)
    kl_sum, agree, positions = 0.0, 0, 0
    for ref, cur in zip(reference.log_probs, current):
        if ref.shape != cur.shape:
            raise ValueError(f"reference log-probs {tuple(ref.shape)} vs current {tuple(cur.shape)}: "
                             "the tokenizer or the vocabulary changed")
        kl_sum += float((ref.exp() * (ref - cur)).sum(-1).clamp_min(0).sum())
        agree += int((ref.argmax(-1) == cur.argmax(-1)).sum())
        positions += ref.shape[0]
    answers = _answers(adapter, reference.samples, reference.bs, reference.max_new_tokens)
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, reference.answers))
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions,
            "answer_agreement": same / len(answers), "n_samples": len(answers), "n_positions": positions}
