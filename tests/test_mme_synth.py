"""Tests for llmc.data.mme_synth: the procedural MME-format benchmark generator."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmc.calib import load_samples  # noqa: E402
from llmc.data.mme_synth import CATEGORIES, SPLITS, generate, make_scene, split_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MME_COLUMNS = ["question_id", "image", "question", "answer", "category"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("b") / "test", "test", 18, seed=0)


def test_layout_and_columns(bench: Path) -> None:
    assert sorted(p.name for p in bench.iterdir()) == ["images", "mme.jsonl", "samples.json"]
    rows = _jsonl(bench / "mme.jsonl")
    assert len(rows) == 36
    assert len(list((bench / "images").glob("*.png"))) == 18
    for row in rows:
        assert list(row) == MME_COLUMNS
        assert row["question_id"] == Path(row["image"]).name
        assert row["image"].startswith("images/") and (bench / row["image"]).is_file()
        assert row["question"].endswith("? Please answer yes or no.")
        assert row["answer"] in ("Yes", "No")
    with Image.open(bench / rows[0]["image"]) as img:
        assert img.size == (56, 56) and img.mode == "RGB"


def test_one_yes_one_no_per_image(bench: Path) -> None:
    per_image: dict[str, list[dict]] = defaultdict(list)
    for row in _jsonl(bench / "mme.jsonl"):
        per_image[row["image"]].append(row)
    assert len(per_image) == 18
    for rows in per_image.values():
        assert sorted(r["answer"] for r in rows) == ["No", "Yes"]
        assert len({r["category"] for r in rows}) == 1
        assert rows[0]["question"] != rows[1]["question"]


def test_categories_balanced(bench: Path) -> None:
    counts = Counter(r["category"] for r in _jsonl(bench / "mme.jsonl"))
    assert set(counts) == set(CATEGORIES)
    assert {"existence", "count", "color", "position", "OCR", "numerical_calculation"} <= set(counts)
    assert set(counts.values()) == {2 * 18 // len(CATEGORIES)}


def test_samples_json_matches_jsonl(bench: Path) -> None:
    entries = json.loads((bench / "samples.json").read_text())
    rows = _jsonl(bench / "mme.jsonl")
    assert len(entries) == len(rows)
    for e, r in zip(entries, rows):
        assert set(e) == {"image", "question", "answer", "category", "question_id"}
        assert (e["image"], e["question"], e["answer"], e["category"], e["question_id"]) == (
            r["image"], r["question"], r["answer"], r["category"], r["question_id"])


def test_loads_with_custom_mm(bench: Path) -> None:
    samples = load_samples("custom_mm", bench, None)
    rows = _jsonl(bench / "mme.jsonl")
    assert len(samples) == len(rows)
    for s, r in zip(samples, rows):
        assert s.question == r["question"] and s.answer == r["answer"]
        assert s.images == ((bench / r["image"]).resolve(),)
    assert len(load_samples("custom_mm", bench, 5, shuffle=True)) == 5


def test_questions_match_scene_content() -> None:
    """Spot-check that question answers are consistent with what the scene draws."""
    rng = random.Random(0)
    for _ in range(30):
        desc, pair = make_scene(rng, "count", 56, "train", set())
        objs = desc[3]
        for question, answer in pair:
            if "objects" in question or "one object" in question:
                words = question.split()
                n = ["zero", "one", "two", "three", "four", "five", "six"].index(words[2])
                assert (n == len(objs)) == (answer == "Yes")
        desc, pair = make_scene(rng, "existence", 56, "train", set())
        present = {(c, s) for c, s, *_ in desc[3]}
        for question, answer in pair:
            color, shape = question.split()[3:5]
            assert ((color, shape) in present) == (answer == "Yes")
        desc, pair = make_scene(rng, "color", 56, "train", set())
        colors = {s: c for c, s, *_ in desc[3]}
        for question, answer in pair:  # "Is the circle red?"
            shape, color = question.rstrip("?").split()[2:4]
            assert (colors[shape] == color) == (answer == "Yes")
        desc, pair = make_scene(rng, "position", 56, "train", set())
        xs = {(c, s): cx for c, s, cx, *_ in desc[3]}
        for question, answer in pair:  # "Is the red circle on the left of the blue square?"
            w = question.rstrip("?").split()
            a, side, b = (w[2], w[3]), w[6], (w[9], w[10])
            truth = xs[a] < xs[b] if side == "left" else xs[a] > xs[b]
            assert truth == (answer == "Yes")


def test_deterministic_same_seed(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", "calib", 12, seed=7)
    b = generate(tmp_path / "b", "calib", 12, seed=7)
    c = generate(tmp_path / "c", "calib", 12, seed=8)
    assert _file_bytes(a) == _file_bytes(b)
    assert _file_bytes(a) != _file_bytes(c)


def test_splits_disjoint_by_image_bytes(tmp_path: Path) -> None:
    hashes: dict[str, set[str]] = {}
    for split in SPLITS:
        for seed in (0, 1):
            out = generate(tmp_path / f"{split}{seed}", split, 24, seed=seed)
            digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").glob("*.png")]
            assert len(set(digests)) == len(digests), "images repeat within a split"
            hashes.setdefault(split, set()).update(digests)
    assert not hashes["train"] & hashes["calib"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["calib"] & hashes["test"]


def test_scene_partition_by_split() -> None:
    rng = random.Random(123)
    for split in SPLITS:
        seen: set = set()
        for cat in CATEGORIES:
            desc, _ = make_scene(rng, cat, 56, split, seen)
            assert split_of(desc) == split
    assert {split_of(("x", i)) for i in range(60)} == set(SPLITS)


def test_refuses_existing_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists and is not an empty folder"):
        generate(out, "train", 2, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temp folder left behind"
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError):
        generate(afile, "train", 2, seed=0)


def test_empty_existing_folder_is_used(tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert generate(out, "train", 2, seed=0) == out.resolve()
    assert (out / "mme.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        generate(tmp_path / "x", "dev", 2, seed=0)
    with pytest.raises(ValueError, match="n_images=0 is invalid"):
        generate(tmp_path / "x", "test", 0, seed=0)
    with pytest.raises(ValueError, match="size=8 is too small"):
        generate(tmp_path / "x", "test", 2, seed=0, size=8)
    assert not (tmp_path / "x").exists()


def test_other_size(tmp_path: Path) -> None:
    out = generate(tmp_path / "big", "train", 6, seed=0, size=96)
    for p in (out / "images").glob("*.png"):
        with Image.open(p) as img:
            assert img.size == (96, 96)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "llmc.data.mme_synth", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = _cli("--out", str(out), "--split", "train", "--n-images", "6", "--seed", "3", "--size", "48")
    assert res.returncode == 0, res.stderr
    assert "wrote 6 images / 12 questions" in res.stdout
    rows = _jsonl(out / "mme.jsonl")
    assert len(rows) == 12 and {r["category"] for r in rows} == set(CATEGORIES)
    assert _file_bytes(out) == _file_bytes(generate(tmp_path / "api", "train", 6, seed=3, size=48))
    res = _cli("--out", str(out), "--split", "train", "--n-images", "6", "--seed", "3")
    assert res.returncode == 2 and "already exists" in res.stderr
    res = _cli("--out", str(tmp_path / "z"), "--split", "dev", "--n-images", "6", "--seed", "3")
    assert res.returncode == 2 and "invalid choice: 'dev'" in res.stderr
