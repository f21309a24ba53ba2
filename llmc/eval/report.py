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


def _chart_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, float]]]:
    """Per-category rows and the total; perception/cognition sub-totals left out (cognition is often empty)."""
    return [(label, vals) for label, vals in score_rows(results) if not label.endswith(("/perception", "/cognition"))]


def _fidelity_text(results: dict[str, dict[str, Any]]) -> str:
    lines = []
    for pos, r in results.items():
        f = r.get("fidelity")
        if f:
            lines.append(f"{pos}: KL {_fmt(f['kl'], 4)}, top-1 agreement {100 * f['top1_agreement']:.1f} %, "
                         f"answer agreement {100 * f['answer_agreement']:.1f} %")
    return "fidelity vs the float model (held-out samples):\n  " + ("\n  ".join(lines) if lines else "not measured")


def _bar_chart(results: dict[str, dict[str, Any]], path: Path, title: str | None = None) -> None:
    """Recovery % (value / baseline) per category and the total, one bar per later position, each bar
    labelled with the scores and the delta; the axis is zoomed on the losses. With only the baseline,
    its absolute scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = baseline_position(results)
    others = [p for p in results if p != base] or [base]
    rows = _chart_rows(results)
    n_fid = sum(1 for r in results.values() if r.get("fidelity"))
    fig, ax = plt.subplots(figsize=(9.5, 1.6 + 0.5 * len(rows) * len(others) + 0.25 * n_fid))
    height = 0.8 / len(others)
    recs = []
    for k, pos in enumerate(others):
        for i, (label, vals) in enumerate(rows):
            b, v = vals.get(base), vals.get(pos)
            if v is None:
                continue
            rec = 100.0 * v / b if b else float("nan")
            recs.append(rec)
            y = i + (k - (len(others) - 1) / 2) * height
            ax.barh(y, rec if b else 0.0, height=height * 0.9, color=f"C{k}", label=pos if i == 0 else None)
            text = f"{v:.0f}" if pos == base else f"{b:.0f} → {v:.0f} ({v - b:+.0f}, {rec:.1f} %)"
            ax.text(rec if b else 0.0, y, "  " + (text if b else f"{v:.0f} (baseline 0)"), va="center", fontsize=8)
    finite = [r for r in recs if r == r]
    low = min(finite + [100.0])
    ax.set_xlim(max(0.0, min(90.0, low - 5.0)), max(finite + [100.0]) + 12.0)
    ax.axvline(100.0, color="0.3", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel(f"recovery % of {base} (100 = no loss)")
    ax.set_title((title + "\n" if title else "") + f"score recovery vs {base}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.text(0.01, 0.01, _fidelity_text(results), fontsize=8, va="bottom")
    fig.tight_layout(rect=(0, 0.02 + 0.03 * (n_fid + 1), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, dict[str, Any]], out_dir: str | Path, title: str | None = None) -> str:
    """Write ``report.json``, ``report.md`` and ``report.png`` into ``out_dir``; returns (and prints) the table.

    ``title`` says what was quantized (model, method, bits/group, parts)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    payload = {"title": title, "baseline": baseline_position(results), "positions": list(results),
               "results": results}
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float) + "\n", encoding="utf-8")
    about = f"{title}\n\n" if title else ""
    head = f"# Evaluation report\n\n{about}Baseline: `{payload['baseline']}`; recovery % = 100 * value / baseline.\n\n"
    (out / "report.md").write_text(head + table, encoding="utf-8")
    _bar_chart(results, out / "report.png", title)
    print(table)
    return table
