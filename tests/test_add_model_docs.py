"""docs/add_model.md stays true: every command and config it shows is run here; the zh_cn copy shows the same."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC, DOC_ZH = REPO / "docs" / "add_model.md", REPO / "docs" / "zh_cn" / "add_model.md"


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


def commands(path: Path) -> list[str]:
    return [line.strip() for b in blocks(path, "bash") for line in b.splitlines() if line.strip()]


def auto_table(path: Path) -> dict[str, str]:
    rows = re.findall(r"^\| ([a-z0-9_, ]+) \| (yes|refused) \|", path.read_text(), flags=re.M)
    return {fam.strip(): verdict for fams, verdict in rows for fam in fams.split(",")}


def test_translation_shows_the_same_commands_config_and_table():
    assert commands(DOC) == commands(DOC_ZH) and len(commands(DOC)) == 3
    def code(path: Path) -> list[str]:  # comments are translated
        return [line.split("  #")[0] for b in blocks(path, "python") for line in b.splitlines()]

    assert blocks(DOC, "yaml") == blocks(DOC_ZH, "yaml") and code(DOC) == code(DOC_ZH)
    assert auto_table(DOC) == auto_table(DOC_ZH)


def test_auto_table_matches_the_tests():
    from test_auto_adapter import (  # tests/ is on sys.path (pytest rootdir conftest)
        HANDLED,
        REFUSED,
    )
    from test_conformance import AUTO_FAMILIES

    table = auto_table(DOC)
    assert {f for f, v in table.items() if v == "yes"} == set(HANDLED) == set(AUTO_FAMILIES)
    assert {f for f, v in table.items() if v == "refused"} == set(REFUSED)


def test_registration_snippet_is_what_the_package_does():
    init = (REPO / "examples" / "vila_tiny" / "__init__.py").read_text()
    for line in blocks(DOC, "python")[0].splitlines():
        call = line.split("  #")[0].strip().replace('"vila_tiny"', "VilaTinyConfig.model_type")
        assert call.split("(")[0] in init, call


@pytest.fixture(scope="module")
def env(tiny_model, calib_dir, tmp_path_factory) -> dict[str, str]:
    from llmc.testing.tiny_vila import FAMILY, vila_package

    vila_package()
    tmp = tmp_path_factory.mktemp("docs")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL_DIR": str(tiny_model(FAMILY)), "CALIB_DIR": str(calib_dir),
            "OUT_DIR": str(tmp / "out"), "LLMC_CACHE": str(tmp / "cache"), "HF_MODULES_CACHE": str(tmp / "hf"),
            "WORK": str(tmp), "PYTHONPATH": str(REPO)}


def run(cmd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = shlex.split(cmd)
    for i in range(len(argv)):  # expand with the fixture's variables, not this process's
        for key in ("MODEL_DIR", "CALIB_DIR", "OUT_DIR"):
            argv[i] = argv[i].replace(f"${key}", env[key])
    assert argv[0] == "python"
    return subprocess.run([sys.executable, *argv[1:]], cwd=env["WORK"] if argv[-1] == "job.yml" else REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_inspect_command(env):
    cmd = next(c for c in commands(DOC) if " inspect " in c)
    proc = run(cmd, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "projector_writer mm_projector.layers.2" in proc.stdout
    assert run(cmd.replace(" --trust-remote-code", ""), env).returncode == 2  # as the doc says


def test_conformance_command_selects_vila(env):
    cmd = next(c for c in commands(DOC) if "pytest" in c)
    proc = run(cmd + " --collect-only", env)  # the suite itself runs in tests/test_conformance.py
    assert proc.returncode == 0, proc.stdout[-2000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert selected and all("vila_tiny" in line for line in selected)
    assert any("vila_tiny-auto" in line for line in selected)


def test_quantize_command_with_the_doc_config(env):
    text = blocks(DOC, "yaml")[0]
    for key in ("MODEL_DIR", "CALIB_DIR", "OUT_DIR"):
        text = text.replace(f"${key}", env[key])
    cfg = yaml.safe_load(text)
    assert cfg["model"]["trust_remote_code"] is True
    (Path(env["WORK"]) / "job.yml").write_text(yaml.safe_dump(cfg))
    proc = run(next(c for c in commands(DOC) if c.endswith("job.yml")), env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (Path(env["OUT_DIR"]) / "fake" / "config.json").is_file()
