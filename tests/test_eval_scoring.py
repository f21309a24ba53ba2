"""MME scoring with lmms-eval's own functions: known answer patterns give known scores; pair selection."""
from __future__ import annotations

import pytest

from llmc.eval.mme_local import (
    COGNITION,
    PERCEPTION,
    category_scores,
    mme_summary,
    score_samples,
    select_pairs,
    summary_from_logged,
)

CATEGORIES = PERCEPTION + COGNITION


def mme_docs(n_pairs: int = 2) -> list[dict]:
    """``n_pairs`` images per real MME category, each with a Yes question then a No question."""
    docs = []
    for c in CATEGORIES:
        for i in range(n_pairs):
            for ans in ("Yes", "No"):
                docs.append({"question_id": f"{c}/{i}.png", "category": c, "answer": ans,
                             "question": f"Q {c} {i} {ans}? Please answer yes or no."})
    return docs


def summary(docs: list[dict], preds: list[str]) -> dict:
    return mme_summary(category_scores(score_samples(docs, preds)))


def test_the_14_real_categories():
    assert len(PERCEPTION) == 10 and len(COGNITION) == 4


@pytest.mark.parametrize("pattern, per_cat", [
    ("always_yes", 50.0),      # acc 50 (one of two right), acc+ 0
    ("always_no", 50.0),
    ("correct", 200.0),         # acc 100 + acc+ 100
    ("wrong", 0.0),
    ("garbage", 0.0),           # "other" is never right
    ("first_pair_only", 100.0),  # 1 of 2 images fully right: acc 50 + acc+ 50
])
def test_known_patterns(pattern, per_cat):
    docs = mme_docs(2)
    preds = {
        "always_yes": ["Yes"] * len(docs),
        "always_no": ["no."] * len(docs),
        "correct": [d["answer"] + "." for d in docs],
        "wrong": ["No" if d["answer"] == "Yes" else "Yes" for d in docs],
        "garbage": ["\n\n"] * len(docs),
        "first_pair_only": [d["answer"] if d["question_id"].endswith("/0.png") else "maybe" for d in docs],
    }[pattern]
    s = summary(docs, preds)
    assert s["categories"] == {c: per_cat for c in CATEGORIES}
    assert s["perception"] == pytest.approx(10 * per_cat) and s["cognition"] == pytest.approx(4 * per_cat)
    assert s["total"] == pytest.approx(14 * per_cat)
    assert list(s["categories"]) == list(CATEGORIES)  # MME order


def test_all_correct_is_the_maximum():
    docs = mme_docs(1)
    s = summary(docs, [d["answer"] for d in docs])
    assert (s["perception"], s["cognition"]) == (2000.0, 800.0)


def test_mixed_scores_by_hand():
    # existence: image 0 both right (200), image 1 one right (50) -> 125; count: one right of each -> 50
    docs = [d for d in mme_docs(2) if d["category"] in ("existence", "count")]
    preds = ["Yes", "No", "Yes", "Yes", "Yes", "Yes", "No", "No"]
    s = summary(docs, preds)
    assert s["categories"] == {"existence": 125.0, "count": 50.0}
    assert s["perception"] == 175.0 and s["cognition"] == 0.0


def test_summary_from_logged_samples_uses_logged_or_recomputes():
    docs = mme_docs(1)[:4]  # existence + count
    logged = [{"doc": d, "filtered_resps": ["Yes"]} for d in docs]  # recomputed from doc + response
    with_metric = [dict(s, mme_perception_score=r) for s, r in zip(logged, score_samples(docs, ["Yes"] * 4))]
    assert summary_from_logged(logged) == summary_from_logged(with_metric)
    assert summary_from_logged(logged)["categories"] == {"existence": 50.0, "count": 50.0}
    assert summary_from_logged(logged)["n_questions"] == 4


def test_select_pairs_keeps_whole_pairs_round_robin():
    docs = mme_docs(3)
    qids, cats = [d["question_id"] for d in docs], [d["category"] for d in docs]
    idx = select_pairs(qids, cats, limit=9)  # 4 whole pairs, categories round-robin
    assert len(idx) == 8 and idx == sorted(idx)
    chosen = [(cats[i], qids[i]) for i in idx]
    assert all(chosen.count(k) == 2 for k in chosen)
    assert {c for c, _ in chosen} == set(CATEGORIES[:4])
    assert select_pairs(qids, cats, None) == list(range(len(docs)))
    with pytest.raises(ValueError, match="below one MME pair"):
        select_pairs(qids, cats, 1)


def test_select_pairs_refuses_broken_pairs():
    with pytest.raises(ValueError, match="exactly 2 questions"):
        select_pairs(["a", "a", "b"], ["count", "count", "count"], None)
