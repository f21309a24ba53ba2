"""The committed lock is complete, exact, and agrees with setup.py's ranges and requirements.in."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"requirements.lock: {line!r} is not an exact pin"
        pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def setup_requirements() -> list[str]:
    """install_requires and every extra of setup.py, read from its AST (nothing is executed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    return list(kw["install_requires"]) + [r for reqs in kw["extras_require"].values() for r in reqs]


def in_requirements() -> list[str]:
    return [line.split("#", 1)[0].strip() for line in (ROOT / "requirements.in").read_text().splitlines()
            if line.split("#", 1)[0].strip()]


def unsatisfied(reqs: list[str], pins: dict[str, str]) -> list[str]:
    bad = []
    for text in reqs:
        req = Requirement(text)
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            bad.append(f"{text} (locked: {version})")
    return bad


def test_lock_pins_every_package_exactly():
    pins = locked()
    assert len(pins) > 100  # transitive dependencies included, not only the direct ones
    assert tuple(int(x) for x in pins["filelock"].split(".")[:2]) < (4, 3)  # lmms-eval needs filelock._api


def test_lock_satisfies_setup_py_and_requirements_in():
    pins = locked()
    assert unsatisfied(setup_requirements(), pins) == []
    assert unsatisfied(in_requirements(), pins) == []


def test_setup_py_excludes_the_filelock_that_breaks_lmms_eval():
    reqs = [Requirement(r) for r in setup_requirements()]
    filelock = [r for r in reqs if canonicalize_name(r.name) == "filelock"]
    assert filelock and not any(r.specifier.contains("4.3.1") for r in filelock)


def test_unsatisfied_names_the_bad_pin():
    assert unsatisfied(["filelock<4.3"], {"filelock": "4.3.1"}) == ["filelock<4.3 (locked: 4.3.1)"]
    assert unsatisfied(["gguf>=0.17"], {}) == ["gguf>=0.17 (locked: None)"]


def test_ci_and_readme_install_from_the_lock():
    assert "-r requirements.lock" in (ROOT / ".ci" / "run").read_text()
    assert "requirements.lock" in (ROOT / "README.md").read_text()
