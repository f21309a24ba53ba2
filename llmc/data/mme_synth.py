"""Procedural MME-format benchmark generator.

Draws small images (default 56x56) with PIL and asks, per image, an MME pair of
yes/no questions: one whose answer is "Yes" and one whose answer is "No", in one
of :data:`CATEGORIES` (assigned round-robin across images, so categories stay
balanced).

Output folder layout (written atomically: temp folder + rename)::

    DIR/images/<split>_000000.png ...
    DIR/samples.json   # custom_mm format (+ "category", "question_id" keys)
    DIR/mme.jsonl      # MME columns: question_id, image, question, answer, category

Split disjointness
------------------
The RNG is seeded from ``(split, seed)``. On top of that every scene is described
by a canonical *descriptor* (all that is drawn, nothing else) and a scene is only
kept by split ``s`` when ``sha256(descriptor) % 3`` equals the index of ``s``:
the three splits draw from disjoint parts of the scene space, so train, calib and
test can never contain the same image, whatever the seeds and sizes. Within a
split, descriptors are also unique.

CLI::

    python -m llmc.data.mme_synth --out DIR --split test --n-images 60 --seed 0
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

__all__ = ["CATEGORIES", "SPLITS", "Scene", "generate", "main", "make_scene", "render", "split_of"]

SPLITS: tuple[str, ...] = ("train", "calib", "test")
CATEGORIES: tuple[str, ...] = (
    "existence", "count", "color", "position", "OCR", "numerical_calculation",
)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (230, 190, 0),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (255, 255, 255), (244, 244, 244), (235, 235, 235), (250, 247, 238),
)
TEXT_COLORS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (20, 30, 110), (110, 20, 20), (20, 80, 20))
OCR_CHARS = "23456789ACDEFHJKLMNPRTUVWXY"  # no look-alikes (0/O, 1/I, 5/S, 6/G, 8/B, 2/Z)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SUFFIX = " Please answer yes or no."
MIN_SIZE = 32
_MAX_TRIES = 1000

Obj = tuple[str, str, int, int, int]  # (color, shape, cx, cy, half-extent)
#: (descriptor, [(question, answer), (question, answer)]); the descriptor alone fixes the image.
Scene = tuple[tuple[Any, ...], list[tuple[str, str]]]


def split_of(descriptor: tuple[Any, ...]) -> str:
    """The only split allowed to use a scene with this descriptor (hash partition)."""
    digest = hashlib.sha256(repr(descriptor).encode("utf-8")).digest()
    return SPLITS[int.from_bytes(digest[:8], "big") % len(SPLITS)]


def _place(rng: random.Random, size: int, cells: list[tuple[int, int]], specs: list[tuple[str, str]]) -> list[Obj]:
    """Put one object per (color, shape) spec in the given 3x3 grid cells, jittered inside its cell."""
    cell = size // 3
    margin = (size - 3 * cell) // 2
    objs = []
    for (color, shape), (col, row) in zip(specs, cells):
        half = rng.randint(max(3, int(cell * 0.28)), max(3, int(cell * 0.4)))
        slack = max(0, cell // 2 - half - 1)
        cx = margin + col * cell + cell // 2 + rng.randint(-slack, slack)
        cy = margin + row * cell + cell // 2 + rng.randint(-slack, slack)
        objs.append((color, shape, cx, cy, half))
    return objs


def _shape_desc(rng: random.Random, size: int, specs: list[tuple[str, str]]) -> tuple[Any, ...]:
    """Descriptor of a shapes scene with objects ``specs`` in random distinct cells."""
    cells = rng.sample([(c, r) for c in range(3) for r in range(3)], len(specs))
    bg = rng.choice(BACKGROUNDS)
    return ("shapes", size, bg, tuple(sorted(_place(rng, size, cells, specs))))


def _pair(rng: random.Random, yes_q: str, no_q: str) -> list[tuple[str, str]]:
    """The MME pair in random order."""
    pair = [(yes_q, "Yes"), (no_q, "No")]
    rng.shuffle(pair)
    return pair


def _random_specs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """``n`` random (color, shape) specs (repeats allowed)."""
    return [(rng.choice(list(COLORS)), rng.choice(SHAPES)) for _ in range(n)]


def _scene_existence(rng: random.Random, size: int) -> Scene:
    """Ask about a present and an absent colored shape."""
    specs = _random_specs(rng, rng.randint(1, 3))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in specs]
    yes, no = rng.choice(specs), rng.choice(absent)
    q = "Is there a {} {} in the image?"
    return _shape_desc(rng, size, specs), _pair(rng, q.format(*yes), q.format(*no))


def _count_q(n: int, noun: str) -> str:
    """'Is there one circle' / 'Are there three objects' question."""
    if n == 1:
        return f"Is there one {noun} in the image?"
    return f"Are there {NUMBER_WORDS[n]} {noun}s in the image?"


def _scene_count(rng: random.Random, size: int) -> Scene:
    """Count all objects, or the objects of one shape."""
    if rng.random() < 0.5:
        n = rng.randint(1, 5)
        specs, noun = _random_specs(rng, n), "object"
    else:
        noun = rng.choice(SHAPES)
        n = rng.randint(1, 3)
        others = [s for s in SHAPES if s != noun]
        specs = [(rng.choice(list(COLORS)), noun) for _ in range(n)]
        specs += [(rng.choice(list(COLORS)), rng.choice(others)) for _ in range(rng.randint(0, 2))]
    wrong = rng.choice([m for m in range(1, 6) if m != n])
    return _shape_desc(rng, size, specs), _pair(rng, _count_q(n, noun), _count_q(wrong, noun))


def _scene_color(rng: random.Random, size: int) -> Scene:
    """1-2 objects of distinct shapes; ask the color of one of them."""
    shapes = rng.sample(SHAPES, rng.randint(1, 2))
    specs = [(rng.choice(list(COLORS)), s) for s in shapes]
    color, shape = rng.choice(specs)
    wrong = rng.choice([c for c in COLORS if c != color])
    q = "Is the {} {}?"
    return _shape_desc(rng, size, specs), _pair(rng, q.format(shape, color), q.format(shape, wrong))


def _scene_position(rng: random.Random, size: int) -> Scene:
    """Two distinct objects in different columns; ask left/right relations."""
    a, b = rng.sample([(c, s) for c in COLORS for s in SHAPES], 2)
    col_a, col_b = rng.sample(range(3), 2)
    cells = [(col_a, rng.randrange(3)), (col_b, rng.randrange(3))]
    objs = _place(rng, size, cells, [a, b])
    desc = ("shapes", size, rng.choice(BACKGROUNDS), tuple(sorted(objs)))
    left, right = (a, b) if objs[0][2] < objs[1][2] else (b, a)
    if rng.random() < 0.5:
        q = "Is the {} {} on the left of the {} {}?"
        yes_q, no_q = q.format(*left, *right), q.format(*right, *left)
    else:
        q = "Is the {} {} on the right of the {} {}?"
        yes_q, no_q = q.format(*right, *left), q.format(*left, *right)
    return desc, _pair(rng, yes_q, no_q)


def _font() -> ImageFont.ImageFont:
    """PIL's built-in bitmap font (pixel-exact, the same on every machine)."""
    return ImageFont.load_default_imagefont()


def _glyphs(text: str) -> Image.Image:
    """``text`` drawn with the bitmap font as an "L" mask cropped to its ink."""
    font = _font()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font)
    return mask.crop(mask.getbbox())


def _text_desc(rng: random.Random, size: int, text: str) -> tuple[Any, ...]:
    """Descriptor of ``text`` rendered with the bitmap font, scaled up by an integer factor."""
    w, h = _glyphs(text).size
    scale = max(1, min(int(size * 0.8) // w, int(size * 0.7) // h))
    x = rng.randint(0, size - w * scale)
    y = rng.randint(0, size - h * scale)
    return ("text", size, rng.choice(BACKGROUNDS), text, rng.choice(TEXT_COLORS), scale, x, y)


def _scene_ocr(rng: random.Random, size: int) -> Scene:
    """A single rendered character."""
    char, wrong = rng.sample(OCR_CHARS, 2)
    q = "Is the character in the image {}?"
    return _text_desc(rng, size, char), _pair(rng, q.format(char), q.format(wrong))


def _scene_numerical(rng: random.Random, size: int) -> Scene:
    """A rendered 'a+b' or 'a-b' with one-digit operands."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        text, value = f"{a}+{b}", a + b
    else:
        a, b = max(a, b), min(a, b)
        text, value = f"{a}-{b}", a - b
    wrong = value + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if value + d >= 0])
    q = "Is the answer to the arithmetic question in the image {}?"
    return _text_desc(rng, size, text), _pair(rng, q.format(value), q.format(wrong))


_MAKERS: dict[str, Callable[[random.Random, int], Scene]] = {
    "existence": _scene_existence, "count": _scene_count, "color": _scene_color,
    "position": _scene_position, "OCR": _scene_ocr, "numerical_calculation": _scene_numerical,
}


def make_scene(rng: random.Random, category: str, size: int, split: str, seen: set[tuple[Any, ...]]) -> Scene:
    """Draw scenes of ``category`` until one belongs to ``split`` and is not in ``seen`` (then add it)."""
    for _ in range(_MAX_TRIES):
        desc, pair = _MAKERS[category](rng, size)
        if desc not in seen and split_of(desc) == split:
            seen.add(desc)
            return desc, pair
    raise RuntimeError(
        f"could not draw a new {category!r} scene for split {split!r} after {_MAX_TRIES} tries; "
        "ask for fewer images or a larger --size"
    )


def render(desc: tuple[Any, ...]) -> Image.Image:
    """Draw the image that a scene descriptor describes."""
    kind, size, bg = desc[0], desc[1], desc[2]
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    if kind == "shapes":
        for color, shape, cx, cy, half in desc[3]:
            fill, box = COLORS[color], (cx - half, cy - half, cx + half, cy + half)
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
        return img
    text, color, scale, x, y = desc[3:]
    mask = _glyphs(text)
    mask = mask.resize((mask.width * scale, mask.height * scale), Image.NEAREST)
    img.paste(color, (x, y, x + mask.width, y + mask.height), mask)
    return img


def _check_args(out: Path, split: str, n_images: int, size: int) -> None:
    """Validate ``generate`` arguments (before anything is written)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if n_images < 1:
        raise ValueError(f"n_images={n_images} is invalid; expected an integer >= 1")
    if size < MIN_SIZE:
        raise ValueError(f"size={size} is too small; expected >= {MIN_SIZE} pixels")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"output {str(out)!r} already exists and is not an empty folder; refusing to overwrite")


def _write(tmp: Path, split: str, n_images: int, seed: int, size: int) -> None:
    """Write images, samples.json and mme.jsonl into the folder ``tmp``."""
    rng = random.Random(f"llmc.mme_synth:{split}:{seed}")
    (tmp / "images").mkdir()
    seen: set[tuple[Any, ...]] = set()
    samples, rows = [], []
    for i in range(n_images):
        category = CATEGORIES[i % len(CATEGORIES)]
        desc, pair = make_scene(rng, category, size, split, seen)
        name = f"{split}_{i:06d}.png"
        render(desc).save(tmp / "images" / name, format="PNG")
        for question, answer in pair:
            q = question + SUFFIX
            samples.append({"image": f"images/{name}", "question": q, "answer": answer,
                            "category": category, "question_id": name})
            rows.append({"question_id": name, "image": f"images/{name}", "question": q,
                         "answer": answer, "category": category})
    (tmp / "samples.json").write_text(json.dumps(samples, indent=1) + "\n", encoding="utf-8")
    with open(tmp / "mme.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def generate(out: Path, split: str, n_images: int, seed: int, size: int = 56) -> Path:
    """Generate an MME-format benchmark of ``n_images`` images (2 questions each) in ``out``.

    ``out`` must not exist or be an empty folder. Everything is written into a
    temporary sibling folder that is renamed to ``out`` at the end, so a failed
    run leaves nothing behind. Returns ``out`` resolved.
    """
    out = Path(out).absolute()
    _check_args(out, split, n_images, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write(tmp, split, n_images, seed, size)
        if out.is_dir():
            out.rmdir()  # empty (checked above); fails loudly if something appeared meanwhile
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out.resolve()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m llmc.data.mme_synth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--split", choices=SPLITS, required=True)
    parser.add_argument("--n-images", type=int, required=True, help="number of images (2 questions each)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--size", type=int, default=56, help="image side in pixels (default 56)")
    args = parser.parse_args(argv)
    try:
        out = generate(args.out, args.split, args.n_images, args.seed, args.size)
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {args.n_images} images / {2 * args.n_images} questions to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
