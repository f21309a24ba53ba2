"""Evaluate a (tiny) Qwen2-VL checkpoint on the synthetic MME test split: MME scores and open-ended accuracy.

* MME: greedy generation, ``parse_pred_ans``, per category 100 * (acc + acc+), with lmms-eval's MME prompt
  and with the generator's questions verbatim (see ``tools/train_tiny_vlm.py``);
* open-ended: the auxiliary questions of ``tools/tiny_vlm_data.py`` (object listing, count, color of a
  shape, where an object is, written text, arithmetic result) on the same test images, exact match
  (the scene descriptors are re-drawn with the generator's own seeded RNG).

Usage::

    python tools/eval_tiny_vlm.py --model llmc/assets/tiny_qwen2vl_mme [--n-images 300]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_vlm_data import LMMS_POST_PROMPT, aux_questions

from llmc.data import mme_synth as ms


def _prompt(sample: dict[str, Any], lmms_prompt: bool) -> str:
    question = sample["question"].strip()
    return question.replace(ms.SUFFIX, "") + LMMS_POST_PROMPT if lmms_prompt else question


@torch.no_grad()
def evaluate(model: Any, processor: Any, bench: Path, lmms_prompt: bool = True,
             bs: int = 32) -> tuple[dict[str, float], list[dict]]:
    """Greedy generation on an MME-format folder (``samples.json``); returns scores and predictions.

    ``lmms_prompt``: the question as lmms-eval's MME task words it (suffix " Please answer yes or no."
    replaced by :data:`LMMS_POST_PROMPT`), else the generator's question verbatim.
    """
    from PIL import Image

    from llmc.eval.mme_local import category_scores, score_samples

    samples = json.loads((bench / "samples.json").read_text())
    tok = processor.tokenizer
    tok.padding_side = "left"
    model.eval()
    rows = []
    for start in range(0, len(samples), bs):
        chunk = samples[start:start + bs]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _prompt(s, lmms_prompt)}]}],
            tokenize=False, add_generation_prompt=True) for s in chunk]
        images = [Image.open(bench / s["image"]).convert("RGB") for s in chunk]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        preds = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        rows += [dict(s, pred=p) for s, p in zip(chunk, preds)]
    # lmms-eval's own MME scoring: per category acc + acc+, acc+ over the two questions of an image
    return category_scores(score_samples(rows, [r["pred"] for r in rows])), rows


def test_descriptors(n_images: int, seed: int, size: int) -> list[tuple[Any, ...]]:
    """The scene descriptors of ``generate(out, "test", n_images, seed, size)`` (same RNG stream)."""
    rng = random.Random(f"llmc.mme_synth:test:{seed}")
    seen: set[Any] = set()
    return [ms.make_scene(rng, ms.CATEGORIES[i % len(ms.CATEGORIES)], size, "test", seen)[0]
            for i in range(n_images)]


@torch.no_grad()
def open_ended(model: Any, processor: Any, descs: list[tuple[Any, ...]], bs: int = 32) -> dict[str, float]:
    """Exact-match accuracy of greedy answers to the auxiliary questions, per question."""
    rng = random.Random(0)
    items = [(d, q, a) for d in descs for q, a in aux_questions(d, rng)]
    tok = processor.tokenizer
    tok.padding_side = "left"
    hits: dict[str, list[bool]] = {}
    for start in range(0, len(items), bs):
        chunk = items[start:start + bs]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
            tokenize=False, add_generation_prompt=True) for _, q, _ in chunk]
        batch = processor(text=texts, images=[ms.render(d) for d, _, _ in chunk], return_tensors="pt", padding=True)
        out = model.generate(**batch, max_new_tokens=40, do_sample=False)
        preds = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for (_, q, a), p in zip(chunk, preds):
            key = q.split(" the ")[0] if q.startswith(("What color", "Where")) else q
            hits.setdefault(key, []).append(p.strip() == a)
    return {k: round(100 * sum(v) / len(v), 1) for k, v in hits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--n-images", type=int, default=300)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        bench = ms.generate(Path(tmp) / "test", "test", args.n_images, seed=0, size=args.size)
        lmms, _ = evaluate(model, processor, bench, lmms_prompt=True)
        raw, _ = evaluate(model, processor, bench, lmms_prompt=False)
    result = {"mme_lmms_prompt": lmms, "mme_generator_prompt": raw,
              "open_ended_accuracy": open_ended(model, processor, test_descriptors(args.n_images, 0, args.size))}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
