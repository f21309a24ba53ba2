"""Comparison of a runner's result with the reference, the verdict rule, and the markdown matrix.

Reference: the variant's ``fake/`` folder in transformers, float32. Yardstick: the same folder in
bfloat16 (what rounding alone moves). Both are runner results (``common.py`` JSON).

Verdict of one cell (export x runtime), in this order:

* ``FAIL load``: the runtime raised while loading or scoring (error text kept);
* ``FAIL NaN``: any prompt log-prob or greedy margin is NaN/inf;
* ``FAIL ids``: the runtime scored other prompt token ids than the reference (image expansion);
* ``FAIL logprob``: max |prompt log-prob - reference| > ``K`` x the yardstick's max (K = 4);
* ``FAIL greedy``: a greedy token differs from the reference at a step where the reference's
  top-1 / top-2 log-prob margin exceeds that same tolerance (not a near-tie);
* ``PASS`` otherwise; a greedy difference at a near-tie step is reported as ``tie@prompt:step``
  (tokens after it are not compared: the sequences have diverged).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

K = 4.0


def _num(x: Any) -> float:
    return float(x) if x is not None else math.nan  # strings "nan"/"inf" parse too


@dataclass
class Diff:
    """Agreement of one result with the reference over the prompts both scored."""

    greedy_equal: int = 0
    greedy_total: int = 0
    lp_max: float = 0.0
    lp_sum: float = 0.0
    lp_n: int = 0
    nonfinite: bool = False
    id_mismatch: list[str] = field(default_factory=list)
    hard_mismatch: list[str] = field(default_factory=list)
    ties: list[str] = field(default_factory=list)
    prompts: int = 0

    @property
    def lp_mean(self) -> float:
        return self.lp_sum / self.lp_n if self.lp_n else math.nan


def _logprob_diff(d: Diff, ref: dict, run: dict) -> None:
    for a, b in zip(ref["prompt_logprobs"][1:], run["prompt_logprobs"][1:]):
        fa, fb = _num(a), _num(b)
        if not math.isfinite(fb):
            d.nonfinite = True
            continue
        diff = abs(fa - fb)
        d.lp_max, d.lp_sum, d.lp_n = max(d.lp_max, diff), d.lp_sum + diff, d.lp_n + 1


def _greedy_diff(d: Diff, ref: dict, run: dict, tie_tol: float | None) -> None:
    margins = [_num(m) for m in ref.get("margins") or []]
    d.greedy_total += len(ref["greedy"])
    for k, (a, b) in enumerate(zip(ref["greedy"], run["greedy"])):
        if a == b:
            d.greedy_equal += 1
            continue
        tag = f"{ref['id']}:{k}"
        near_tie = tie_tol is not None and k < len(margins) and margins[k] <= tie_tol
        (d.ties if near_tie else d.hard_mismatch).append(tag)
        return


def diff(ref: dict, run: dict, tie_tol: float | None = None) -> Diff:
    """Compare two runner results prompt by prompt (prompts the runtime did not score are left out)."""
    d = Diff()
    by_id = {p["id"]: p for p in run.get("prompts", [])}
    for rp in ref.get("prompts", []):
        p = by_id.get(rp["id"])
        if p is None:
            continue
        d.prompts += 1
        if any(not math.isfinite(_num(m)) for m in p.get("margins") or [] if m is not None):
            d.nonfinite = True
        if p["prompt_ids"] != rp["prompt_ids"]:
            d.id_mismatch.append(rp["id"])
            continue
        _logprob_diff(d, rp, p)
        _greedy_diff(d, rp, p, tie_tol)
    return d


@dataclass
class Cell:
    export: str
    runtime: str
    verdict: str
    detail: str
    diff: Diff | None = None
    yard: Diff | None = None
    error: str | None = None


def judge(export: str, runtime: str, ref: dict, yard: Diff, run: dict) -> Cell:
    """The verdict of one cell (rule in the module docstring)."""
    if not run.get("ok"):
        return Cell(export, runtime, "FAIL load", "", error=run.get("error") or "no result")
    tol = K * yard.lp_max
    d = diff(ref, run, tie_tol=tol)
    if d.prompts == 0:
        return Cell(export, runtime, "FAIL load", "no prompt scored", d, yard, run.get("error"))
    if d.nonfinite:
        verdict, why = "FAIL NaN", "non-finite log-probs"
    elif d.id_mismatch:
        verdict, why = "FAIL ids", f"prompt ids differ: {d.id_mismatch}"
    elif d.lp_max > tol:
        verdict, why = "FAIL logprob", f"max diff {d.lp_max:.4f} > {K:g} x yardstick {yard.lp_max:.4f}"
    elif d.hard_mismatch:
        verdict, why = "FAIL greedy", f"greedy differs at {d.hard_mismatch} (margin > {tol:.3f})"
    else:
        verdict, why = "PASS", f"near-tie at {d.ties}" if d.ties else ""
    return Cell(export, runtime, verdict, why, d, yard, run.get("error"))


def _fmt(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4f}"


def short_error(text: str | None, limit: int = 220) -> str:
    """The informative part of an error, one line (pydantic's wrapper around vLLM's ValueError dropped)."""
    text = " ".join((text or "").split())
    m = re.search(r"Value error, (.*?) \[type=", text)
    return (m.group(1) if m else text)[:limit].replace("|", "\\|")


def matrix(cells: list[Cell]) -> str:
    """Markdown table: one row per (export, runtime)."""
    head = ("| export | runtime | loads | greedy = ref | Δlogprob max / mean | yardstick bf16 max / mean "
            "| verdict | note |\n|---|---|---|---|---|---|---|---|")
    rows = [head]
    for c in cells:
        if c.diff is None:
            rows.append(f"| {c.export} | {c.runtime} | no | – | – | – | **{c.verdict}** | {short_error(c.error)} |")
            continue
        d, y = c.diff, c.yard
        g = f"{d.greedy_equal}/{d.greedy_total}"
        lp = "nan" if d.nonfinite else f"{_fmt(d.lp_max)} / {_fmt(d.lp_mean)}"
        rows.append(f"| {c.export} | {c.runtime} | yes | {g} | {lp} | "
                    f"{_fmt(y.lp_max)} / {_fmt(y.lp_mean)} | **{c.verdict}** | {c.detail} |")
    return "\n".join(rows)
