"""Training data of ``tools/train_tiny_vlm.py``: train-split scenes of :mod:`llmc.data.mme_synth`.

Three kinds of examples, all on images of the generator's train split (its hash partition keeps them
disjoint from the calib and test splits):

* ``mme``: the generator's yes/no pairs, each with the generator's suffix " Please answer yes or no."
  and with lmms-eval's MME post-prompt (:data:`LMMS_POST_PROMPT`);
* ``aux``: open-ended questions read off the same scene descriptors (objects left to right with their
  3x3 cell, object count, color of a shape, where an object is, the written text, the arithmetic result);
* ``warm``: one-object / one-character warm-up scenes with single-attribute questions.

Plus dense labels for a training-only linear probe on the merged image tokens (:func:`vision_targets`).
"""
from __future__ import annotations

import random
from typing import Any

import torch

from llmc.data import mme_synth as ms

PATCH, MERGE, TEMPORAL = 7, 2, 2
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
#: lmms-eval's MME prompt (``mme.yaml`` default): the generator's suffix is replaced by this post-prompt.
LMMS_POST_PROMPT = "\nAnswer the question using a single word or phrase."
# (image index, prompt ids, answer ids, category, question-attribute token, true-attribute token)
Example = tuple[int, list[int], list[int], str, int, int]

def _cell_words(cx: int, cy: int, size: int) -> str:
    cell = size // 3
    margin = (size - 3 * cell) // 2
    col = min(2, max(0, (cx - margin) // cell))
    row = min(2, max(0, (cy - margin) // cell))
    return f"{ROWS[row]} {COLS[col]}"


def aux_questions(desc: tuple[Any, ...], rng: random.Random) -> list[tuple[str, str]]:
    """Open-ended questions whose answers are read off a scene descriptor."""
    if desc[0] == "text":
        text = desc[3]
        out = [("What is written in the image?", text)]
        if len(text) == 3:
            value = eval(text)  # "a+b" / "a-b" with one-digit operands, made by the generator
            out.append(("What is the result of the arithmetic in the image?", str(value)))
        return out
    size, objs = desc[1], sorted(desc[3], key=lambda o: (o[2], o[3]))
    listing = ", ".join(f"{c} {s} {_cell_words(x, y, size)}" for c, s, x, y, _ in objs)
    out = [("List the objects from left to right.", listing),
           ("How many objects are in the image?", ms.NUMBER_WORDS[len(objs)])]
    shapes = [o[1] for o in objs]
    shape = rng.choice(shapes)
    if shapes.count(shape) == 1:
        color = next(o[0] for o in objs if o[1] == shape)
        out.append((f"What color is the {shape}?", color))
    obj = rng.choice(objs)
    out.append((f"Where is the {obj[0]} {obj[1]}?", _cell_words(obj[2], obj[3], size)))
    return out


class Encoder:
    """Chat-template token ids of (question, answer) pairs for a fixed image-token count (cached)."""

    def __init__(self, processor: Any, n_image_tokens: int) -> None:
        self.tok = processor.tokenizer
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
        prompt = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        head, tail = prompt.split("Q")
        pad = "<|image_pad|>"
        self.head = self.tok(head.replace(pad, pad * n_image_tokens))["input_ids"]
        self.tail = self.tok(tail)["input_ids"]
        self.end = self.tok("<|im_end|>")["input_ids"]
        self.cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tok(text)["input_ids"]
        return self.cache[text]

    def __call__(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        return self.head + self.ids(question) + self.tail, self.ids(answer) + self.end


OBJ_CLASSES = [(c, sh) for c in ms.COLORS for sh in ms.SHAPES]  # class 0 = no object centre in the token
TEXT_CHARS = "+-" + "".join(sorted(set(ms.OCR_CHARS + "0123456789")))  # class 0 = no character


def vision_targets(desc: tuple[Any, ...], grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense labels for the auxiliary vision loss: per merged token and per character slot.

    Shapes: token (r, c) of the ``grid`` x ``grid`` merged-token map gets 1 + the (color, shape) class of
    the object covering most of its box (at least 15% of it; else 0). Text: the 3 character slots get 1 + the index in
    :data:`TEXT_CHARS` (0 for an empty slot). The unused half is -100 (ignored).
    """
    cells = torch.full((grid * grid,), -100, dtype=torch.long)
    chars = torch.full((3,), -100, dtype=torch.long)
    if desc[0] == "text":
        text = desc[3]
        chars[:] = torch.tensor([1 + TEXT_CHARS.index(text[k]) if k < len(text) else 0 for k in range(3)])
        return cells, chars
    cells[:] = 0
    step = desc[1] / grid
    best = [0.15 * step * step] * (grid * grid)  # an object must cover >= 15% of a token's box
    for color, shape, cx, cy, half in desc[3]:
        for k in range(grid * grid):
            x0, y0 = (k % grid) * step, (k // grid) * step
            w = min(x0 + step, cx + half) - max(x0, cx - half)
            h = min(y0 + step, cy + half) - max(y0, cy - half)
            if w > 0 and h > 0 and w * h > best[k]:
                best[k], cells[k] = w * h, 1 + OBJ_CLASSES.index((color, shape))
    return cells, chars


def simple_scene(rng: random.Random, size: int, seen: set[Any]) -> tuple[Any, ...]:
    """A warm-up scene of the train split: one shape, or one character (same drawing code)."""
    for _ in range(1000):
        if rng.random() < 0.75:
            desc = ms._shape_desc(rng, size, ms._random_specs(rng, 1))
        else:
            desc = ms._text_desc(rng, size, rng.choice(ms.OCR_CHARS))
        if desc not in seen and ms.split_of(desc) == "train":
            seen.add(desc)
            return desc
    raise RuntimeError("could not draw a new warm-up scene")


def simple_questions(desc: tuple[Any, ...]) -> list[tuple[str, str]]:
    """Single-attribute open questions about a one-object scene."""
    if desc[0] == "text":
        return [("What is written in the image?", desc[3])]
    color, shape, cx, cy, _ = desc[3][0]
    return [("What color is the object?", color), ("What shape is the object?", shape),
            ("Where is the object?", _cell_words(cx, cy, desc[1]))]


def yes_no_questions(desc: tuple[Any, ...], rng: random.Random) -> list[tuple[str, str]]:
    """Single-attribute yes/no pairs about a one-object scene (one true, one false statement)."""
    if desc[0] == "text":
        wrong = rng.choice([c for c in ms.OCR_CHARS if c != desc[3]])
        q = "Is the character in the image {}?"
        return [(q.format(desc[3]), "Yes"), (q.format(wrong), "No")]
    color, shape, _, _, _ = desc[3][0]
    c2 = rng.choice([c for c in ms.COLORS if c != color])
    s2 = rng.choice([s for s in ms.SHAPES if s != shape])
    return [(f"Is the {shape} {color}?", "Yes"), (f"Is the {shape} {c2}?", "No"),
            (f"Is there a {color} {shape} in the image?", "Yes"), (f"Is there a {color} {s2} in the image?", "No")]


def yes_no_examples(enc: Encoder, i: int, pair: list[tuple[str, str]], cat: str) -> list[Example]:
    """Both wordings of a Yes/No pair, each with the attribute token of its question and of the Yes question.

    The attribute token is the first token where the two questions differ (-100 if their lengths differ):
    the yes question's one is the image's true value. They are the targets of the training-only
    comparison probe (:class:`train_tiny_vlm.AnswerProbe`).
    """
    out = []
    for end in (ms.SUFFIX, LMMS_POST_PROMPT):
        enc_pair = {a: enc(q + end, a) for q, a in pair}
        p_yes, p_no = enc_pair["Yes"][0], enc_pair["No"][0]
        diff = [k for k, (x, y) in enumerate(zip(p_yes, p_no)) if x != y] if len(p_yes) == len(p_no) else []
        for p, ans in enc_pair.values():
            q_tok, y_tok = (p[diff[0]], p_yes[diff[0]]) if diff else (-100, -100)
            out.append((i, p, ans, cat, q_tok, y_tok))
    return out


def make_train_set(processor: Any, n_images: int, seed: int, size: int) -> dict[str, Any]:
    """Train-split scenes -> pixel values and warm-up, auxiliary and MME examples.

    ``n_images`` benchmark scenes (round-robin categories) plus ``n_images // 3`` one-object warm-up scenes.
    """
    rng = random.Random(f"train_tiny_vlm:{seed}")
    seen: set[Any] = set()
    data: dict[str, Any] = {"pixels": [], "grids": [], "mme": [], "aux": [], "warm": [], "warm_yn": [],
                            "cells": [], "chars": []}
    enc = None
    for i in range(n_images + n_images // 3):
        if i < n_images:
            cat = ms.CATEGORIES[i % len(ms.CATEGORIES)]
            desc, pair = ms.make_scene(rng, cat, size, "train", seen)
        else:
            desc, pair = simple_scene(rng, size, seen), []
        img = processor.image_processor(images=[ms.render(desc)], return_tensors="pt")
        data["pixels"].append(img["pixel_values"].to(torch.float16))
        data["grids"].append(img["image_grid_thw"])
        if enc is None:
            enc = Encoder(processor, int(img["image_grid_thw"].prod()) // MERGE ** 2)
        cells, chars = vision_targets(desc, int(img["image_grid_thw"][0, 1]) // MERGE)
        data["cells"].append(cells)
        data["chars"].append(chars)
        if i < n_images:
            data["mme"] += yes_no_examples(enc, i, pair, cat)
            data["aux"] += [(i, *enc(q + rng.choice(("", LMMS_POST_PROMPT)), a), "aux", -100, -100)
                            for q, a in aux_questions(desc, rng)]
        else:
            data["warm"] += [(i, *enc(q, a), "warm", -100, -100) for q, a in simple_questions(desc)]
            yn_rng = random.Random(f"warm_yn:{seed}:{i}")  # own RNG: the other pools do not depend on it
            qs = yes_no_questions(desc, yn_rng)
            for k in range(0, len(qs), 2):
                data["warm_yn"] += yes_no_examples(enc, i, qs[k:k + 2], "warm_yn")
    tok = processor.tokenizer
    data.update(pad=tok.pad_token_id, image_token=tok.convert_tokens_to_ids("<|image_pad|>"))
    return data


def collate(data: dict[str, Any], batch: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels on the answer tokens only."""
    width = max(len(b[1]) + len(b[2]) for b in batch)
    ids = torch.full((len(batch), width), data["pad"], dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (_, p, a, *_) in enumerate(batch):
        n = len(p) + len(a)
        ids[r, :n] = torch.tensor(p + a)
        labels[r, len(p):n] = torch.tensor(a)
        mask[r, :n] = 1
    imgs = [b[0] for b in batch]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "mm_token_type_ids": (ids == data["image_token"]).long(),
            "pixel_values": torch.cat([data["pixels"][i] for i in imgs]).float(),
            "image_grid_thw": torch.cat([data["grids"][i] for i in imgs]),
            "cells": torch.stack([data["cells"][i] for i in imgs]),
            "chars": torch.stack([data["chars"][i] for i in imgs]),
            "q_tok": torch.tensor([b[4] for b in batch]), "y_tok": torch.tensor([b[5] for b in batch])}
