"""Side-by-side report of evaluation positions: ``report.json``, ``report.md``, ``report.png``.

``results`` maps a position (``pretrain``, ``transformed``, ``fake_quant``, ...) to the dict
returned by :func:`llmc.eval.run.evaluate_position`. Every other position is compared
with the baseline (``pretrain`` when present, else the first position): delta and
recovery % = 100 * value / baseline (``n/a`` when the baseline is 0). Fidelity rows
(KL, agreements) are shown as values only.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["baseline_position", "markdown_table", "score_rows", "write_report"]

FIDELITY_KEYS = ("kl", "top1_agreement", "answer_agreement")


def baseline_position(results: dict[str, dict[str, Any]]) -> str:
    if not results:
        raise ValueError("no evaluation results to report")
    return "pretrain" if "pretrain" in results else next(iter(results))


def score_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """(label, {position: value}) for every task score, in a stable order (first appearance)."""
    rows: dict[str, dict[str, float]] = {}
    for pos, res in results.items():
        for task, t in res.get("tasks", {}).items():
            if "categories" in t:  # MME-like
                items = [(f"{task}/{c}", v) for c, v in t["categories"].items()]
                items += [(f"{task}/{k}", t[k]) for k in ("perception", "cognition", "total")]
            else:
                items = [(f"{task}/{m}", v) for m, v in t.get("metrics", {}).items()]
            for label, v in items:
                rows.setdefault(label, {})[pos] = float(v)
    return list(rows.items())


def _fmt(v: float | None, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if digits > 2 and v != 0 and abs(v) < 10 ** -digits:  # small KL values stay visible
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per task score (and fidelity metric); per position its value, delta and recovery %."""
    base = baseline_position(results)
    others = [p for p in results if p != base]
    head = ["score", base] + [h for p in others for h in (p, f"Δ {p}", f"rec. {p} %")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, vals in score_rows(results):
        b = vals.get(base)
        cells = [label, _fmt(b)]
        for p in others:
            v = vals.get(p)
            delta = None if v is None or b is None else v - b
            rec = None if v is None or not b else 100.0 * v / b
            cells += [_fmt(v), _fmt(delta), "n/a" if v is not None and not b else _fmt(rec, 1)]
        lines.append("| " + " | ".join(cells) + " |")
    for key in FIDELITY_KEYS:
        vals = {p: r["fidelity"][key] for p, r in results.items() if r.get("fidelity")}
        if vals:
            cells = [f"fidelity/{key}", _fmt(vals.get(base), 4)]
            for p in others:
                cells += [_fmt(vals.get(p), 4), "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bar_chart(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(label, vals) for label, vals in score_rows(results)
            if not label.endswith(("/perception", "/cognition", "/total"))]
    positions = list(results)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * max(1, len(positions)) / 2 + 2), 4.5))
    width = 0.8 / max(1, len(positions))
    for k, pos in enumerate(positions):
        xs = [i + (k - (len(positions) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [vals.get(pos, 0.0) for _, vals in rows], width=width, label=pos)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([label for label, _ in rows], rotation=45, ha="right", fontsize=8)
    top = max([v for _, vals in rows for v in vals.values()] + [1.0])
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("score")
    ax.set_title("evaluation by position")
    # above the axes, one column per position: never on top of a bar
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.06), ncol=max(1, len(positions)), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, dict[str, Any]], out_dir: str | Path) -> str:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; returns (and prints) the table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    payload = {"baseline": baseline_position(results), "positions": list(results), "results": results}
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
    title = f"# Evaluation report\n\nBaseline: `{payload['baseline']}`; recovery % = 100 * value / baseline.\n\n"
    (out / "report.md").write_text(title + table, encoding="utf-8")
    _bar_chart(results, out / "report.png")
    print(table)
    return table
