"""Top hotspots of a py-spy profile in raw (collapsed-stack) format.

    py-spy record --format raw --rate 50 -o gptq.txt -- python bench/llmc_side.py JOB.json
    python bench/profile_hotspots.py gptq.txt [--top 15] [--match llmc/]

Prints two tables, in percent of all samples except those of sleeping helper threads
(tqdm's monitor waiting on its event):

* self: the innermost Python frame (function, file:line), i.e. the line whose call into
  torch / C code the sample landed in;
* inclusive: every function on the stack (function, file, without line), counted once per sample.

``--match`` keeps only frames whose file contains the string in the inclusive table
(e.g. ``llmc/`` for llmc's own functions).
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

IDLE = ("Condition.wait", "Event.wait", "Thread.join", "_wait_for_tstate_lock")  # helper threads asleep
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def short(path: str) -> str:
    """``.../site-packages/x/y.py`` -> ``x/y.py``; ``.../peer/llmc/a.py`` -> ``llmc/a.py``."""
    for marker in ("site-packages/", "/wt/peer/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse(path: Path) -> tuple[Counter, Counter, int]:
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [FRAME.match(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames or frames[-1]["func"] in IDLE:
            continue
        n = int(count)
        total += n
        leaf = frames[-1]
        self_c[f"{leaf['func']} ({short(leaf['file'])}:{leaf['line']})"] += n
        for key in {f"{f['func']} ({short(f['file'])})" for f in frames}:
            incl[key] += n
    return self_c, incl, total


def table(title: str, counts: Counter, total: int, top: int, match: str | None = None) -> str:
    rows = [(k, v) for k, v in counts.most_common() if match is None or match in k][:top]
    lines = [f"| {title} | % of samples |", "|---|---|"]
    lines += [f"| `{k}` | {100 * v / total:.1f} |" for k, v in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--match", default=None, help="only frames whose file contains this (inclusive table)")
    a = p.parse_args()
    self_c, incl, total = parse(a.profile)
    print(f"{a.profile}: {total} samples\n")
    print(table("self (innermost Python line)", self_c, total, a.top) + "\n")
    print(table("inclusive (function)", incl, total, a.top, a.match))


if __name__ == "__main__":
    main()
