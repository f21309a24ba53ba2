"""Tests for llmc.calib.datasets: custom_mm / custom_txt loaders, n_samples and batching."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llmc.calib import LOADERS, Sample, batches, load_samples  # noqa: E402


def _png(path: Path, color: str = "red") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _mm(root: Path, entries: object) -> Path:
    """A custom_mm folder with images/a.png, images/b.png and the given samples.json content."""
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png", "blue")
    text = entries if isinstance(entries, str) else json.dumps(entries)
    (root / "samples.json").write_text(text)
    return root


# ---------------------------------------------------------------- custom_mm: happy path

def test_custom_mm_loads_all_image_forms(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [
        {"image": "images/a.png", "question": "q0", "answer": "a0"},
        {"image": ["images/a.png", "images/b.png"], "question": "q1"},
        {"question": "q2"},
        {"image": None, "question": "q3", "answer": None},
        {"image": str((tmp_path / "ds" / "images" / "b.png").resolve()), "question": "q4"},
        {"image": "images/a.png", "question": "q5", "answer": "Yes", "category": "color", "question_id": "x.png"},
    ])
    got = load_samples("custom_mm", root, None)
    a, b = (root / "images" / "a.png").resolve(), (root / "images" / "b.png").resolve()
    assert got == [
        Sample("q0", (a,), "a0"),
        Sample("q1", (a, b)),
        Sample("q2"),
        Sample("q3"),
        Sample("q4", (b,)),
        Sample("q5", (a,), "Yes"),
    ]
    assert all(p.is_absolute() for s in got for p in s.images)


# ---------------------------------------------------------------- custom_mm: errors

def test_custom_mm_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="custom_mm dataset folder not found: .*nope"):
        load_samples("custom_mm", tmp_path / "nope", 1)


def test_custom_mm_missing_samples_json(tmp_path: Path) -> None:
    (tmp_path / "ds").mkdir()
    with pytest.raises(FileNotFoundError, match="has no samples.json"):
        load_samples("custom_mm", tmp_path / "ds", 1)


def test_custom_mm_invalid_json(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", '[{"question": "q",}')
    with pytest.raises(ValueError, match=r"invalid JSON in .*samples\.json.*line 1 column"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_top_level_not_list(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", {"question": "q"})
    with pytest.raises(ValueError, match="holds a dict; expected a JSON list"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_entry_not_object(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "ok"}, "just a string"])
    with pytest.raises(ValueError, match=r"entry 1: 'just a string' is a str; expected a JSON object"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_missing_question(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"image": "images/a.png"}])
    with pytest.raises(ValueError, match="entry 0: missing required key 'question'"):
        load_samples("custom_mm", root, 1)


@pytest.mark.parametrize("bad", [3, None, "", ["q"]])
def test_custom_mm_non_string_question(tmp_path: Path, bad: object) -> None:
    root = _mm(tmp_path / "ds", [{"question": "fine"}, {"question": bad}])
    with pytest.raises(ValueError, match=re.escape(f"entry 1: 'question' is {bad!r}") + ".*expected a non-empty string"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_non_string_answer(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "answer": 1}])
    with pytest.raises(ValueError, match="entry 0: 'answer' is 1 .*expected a string or null"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_unknown_keys(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "images": "images/a.png", "prompt": "x"}])
    msg = re.escape("entry 0: unknown key(s) ['images', 'prompt']; valid keys are "
                    "['answer', 'category', 'image', 'question', 'question_id']")
    with pytest.raises(ValueError, match=msg):
        load_samples("custom_mm", root, 1)


@pytest.mark.parametrize("bad", [5, {"path": "images/a.png"}])
def test_custom_mm_bad_image_type(tmp_path: Path, bad: object) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "image": bad}])
    with pytest.raises(ValueError, match=re.escape(f"entry 0: 'image' is {bad!r}") + ".*expected a string path, a list"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_bad_image_list_item(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "image": ["images/a.png", 7]}])
    with pytest.raises(ValueError, match="entry 0: image path 7 is invalid; expected a non-empty string"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_missing_image(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q"}, {"question": "q", "image": ["images/a.png", "images/zz.png"]}])
    with pytest.raises(FileNotFoundError, match=r"entry 1: image file 'images/zz.png' not found \(looked for .*zz\.png"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_unreadable_image(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "image": "images/broken.png"}])
    (root / "images" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"entry 0: image file 'images/broken.png' cannot be opened by PIL .*expected a valid image"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_truncated_image(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "image": "images/cut.png"}])
    data = (root / "images" / "a.png").read_bytes()
    (root / "images" / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="entry 0: image file 'images/cut.png' cannot be opened by PIL"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_relative_escape(tmp_path: Path) -> None:
    _png(tmp_path / "outside.png")
    root = _mm(tmp_path / "ds", [{"question": "q", "image": "../outside.png"}])
    with pytest.raises(ValueError, match=r"entry 0: image path '\.\./outside\.png' resolves to .*escapes the dataset folder"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_absolute_outside(tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside.png").resolve()
    root = _mm(tmp_path / "ds", [{"question": "q", "image": str(outside)}])
    with pytest.raises(ValueError, match=re.escape(f"entry 0: image path {str(outside)!r}") + ".*escapes the dataset folder"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_symlink_escape(tmp_path: Path) -> None:
    outside = _png(tmp_path / "secret" / "x.png")
    root = _mm(tmp_path / "ds", [{"question": "q", "image": "images/link.png"}])
    (root / "images" / "link.png").symlink_to(outside)
    with pytest.raises(ValueError, match=r"entry 0: image path 'images/link\.png' resolves to .*secret.*escapes the dataset folder"):
        load_samples("custom_mm", root, 1)


def test_custom_mm_symlink_inside_is_fine(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [{"question": "q", "image": "images/link.png"}])
    (root / "images" / "link.png").symlink_to(root / "images" / "a.png")
    assert load_samples("custom_mm", root, 1)[0].images == ((root / "images" / "a.png").resolve(),)


def test_custom_mm_empty_list(tmp_path: Path) -> None:
    root = _mm(tmp_path / "ds", [])
    with pytest.raises(ValueError, match="is an empty list; expected at least one sample"):
        load_samples("custom_mm", root, None)


# ---------------------------------------------------------------- custom_txt

def test_custom_txt_folder_sorted_and_skips_empty(tmp_path: Path) -> None:
    d = tmp_path / "txt"
    d.mkdir()
    (d / "b.txt").write_text("second\n")
    (d / "a.txt").write_text("first")
    (d / "c.txt").write_text("  \n")
    (d / "notes.md").write_text("ignored")
    assert load_samples("custom_txt", d, None) == [Sample("first"), Sample("second")]


def test_custom_txt_json_file(tmp_path: Path) -> None:
    f = tmp_path / "texts.json"
    f.write_text(json.dumps(["one", "", "two", "three"]))
    assert [s.question for s in load_samples("custom_txt", f, None)] == ["one", "two", "three"]
    assert all(s.images == () and s.answer is None for s in load_samples("custom_txt", f, None))


def test_custom_txt_folder_with_data_json(tmp_path: Path) -> None:
    d = tmp_path / "ds"
    d.mkdir()
    (d / "data.json").write_text(json.dumps(["x", "y"]))
    assert [s.question for s in load_samples("custom_txt", d, 2)] == ["x", "y"]


def test_custom_txt_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="custom_txt dataset not found"):
        load_samples("custom_txt", tmp_path / "missing", 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no non-empty texts"):
        load_samples("custom_txt", tmp_path / "empty", 1)
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps(["", "   "]))
    with pytest.raises(ValueError, match="holds no non-empty texts"):
        load_samples("custom_txt", blank, 1)
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps(["ok", 3]))
    with pytest.raises(ValueError, match=r"entry 1: 3 is a int; expected a string"):
        load_samples("custom_txt", mixed, 1)
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"a": "b"}))
    with pytest.raises(ValueError, match="holds a dict; expected a JSON list of strings"):
        load_samples("custom_txt", obj, 1)
    broken = tmp_path / "broken.json"
    broken.write_text("[\"a\"")
    with pytest.raises(ValueError, match="invalid JSON in"):
        load_samples("custom_txt", broken, 1)
    other = tmp_path / "x.csv"
    other.write_text("a,b")
    with pytest.raises(ValueError, match="is not a .json file"):
        load_samples("custom_txt", other, 1)


# ---------------------------------------------------------------- registry, n_samples, shuffle

def test_unknown_name_lists_valid(tmp_path: Path) -> None:
    assert set(LOADERS) == {"custom_mm", "custom_txt"}
    with pytest.raises(ValueError, match=re.escape("unknown calibration dataset 'pileval'; valid names are ['custom_mm', 'custom_txt']")):
        load_samples("pileval", tmp_path, 1)


@pytest.fixture()
def ten_texts(tmp_path: Path) -> Path:
    f = tmp_path / "t.json"
    f.write_text(json.dumps([f"t{i}" for i in range(10)]))
    return f


def test_n_samples_first_n_and_all(ten_texts: Path) -> None:
    assert [s.question for s in load_samples("custom_txt", ten_texts, 3)] == ["t0", "t1", "t2"]
    assert len(load_samples("custom_txt", ten_texts, 10)) == 10
    assert len(load_samples("custom_txt", ten_texts, None)) == 10
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"n_samples={bad} is not valid; use a number >= 1, or None"):
            load_samples("custom_txt", ten_texts, bad)


def test_n_samples_too_many(ten_texts: Path) -> None:
    with pytest.raises(ValueError, match="n_samples=11 requested but .* has only 10 samples available"):
        load_samples("custom_txt", ten_texts, 11)


def test_shuffle_is_seeded(ten_texts: Path) -> None:
    a = load_samples("custom_txt", ten_texts, 10, seed=1, shuffle=True)
    b = load_samples("custom_txt", ten_texts, 10, seed=1, shuffle=True)
    c = load_samples("custom_txt", ten_texts, 10, seed=2, shuffle=True)
    assert a == b
    assert a != c
    assert sorted(s.question for s in a) == [f"t{i}" for i in range(10)]
    assert load_samples("custom_txt", ten_texts, 4, seed=1, shuffle=True) == a[:4]


# ---------------------------------------------------------------- batches

def test_batches() -> None:
    s = [Sample(f"q{i}") for i in range(5)]
    assert batches(s, -1) == [s]
    assert batches(s, 2) == [s[0:2], s[2:4], s[4:5]]
    assert batches(s, 1) == [[x] for x in s]
    assert batches(s, 5) == [s]
    assert batches(s, 100) == [s]
    assert batches([], 3) == []


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_batches_invalid(bad: object) -> None:
    with pytest.raises(ValueError, match=re.escape(f"batch size bs={bad!r} is invalid; expected -1")):
        batches([Sample("q")], bad)  # type: ignore[arg-type]
