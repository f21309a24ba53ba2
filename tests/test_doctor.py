"""`llmc doctor`: versions, device, and each known incompatibility found by importing, with its fix."""
from __future__ import annotations

import importlib

from llmc import doctor


def test_doctor_passes_in_the_locked_environment(capsys):
    assert doctor.doctor_main([]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "transformers", "lmms-eval", "compressed-tensors", "accelerate", "device"):
        assert f"\n{name}" in "\n" + out, name
    assert "ok    lmms-eval evaluator" in out and "all checks passed" in out


def test_doctor_names_the_filelock_break_and_its_fix(capsys, monkeypatch):
    real = importlib.import_module

    def without_api(name, *a, **k):
        if name == "filelock._api":  # what filelock 4.3 did
            raise ModuleNotFoundError("No module named 'filelock._api'")
        return real(name, *a, **k)
    monkeypatch.setattr(doctor.importlib, "import_module", without_api)
    assert doctor.doctor_main([]) == 1
    out = capsys.readouterr().out
    assert "FAIL  filelock._api: RuntimeError: filelock" in out
    assert "fix: pip install 'filelock<4.3'" in out and "1 check(s) failed" in out
