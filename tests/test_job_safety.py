"""Nothing a user owns is overwritten or deleted; a killed run's leftovers are cleaned; finished work is kept.

Each case runs the real command line (in-process ``llmc.cli.main`` where that is enough, a real
process where exit codes or signals matter) and compares checksums of the user's folders before
and after.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmc.cli import main
from llmc.export.atomic import MARKER, read_marker

ROOT = Path(__file__).resolve().parent.parent


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (hidden ones included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


pytestmark = pytest.mark.usefixtures("restore_logging")  # conftest: the CLI job adds log sinks


@pytest.fixture
def job(tmp_path, tiny_model, calib_dir):
    """A fast RTN job on a tiny Qwen2-VL, written as ``tmp_path/cfg/job.yml``; returns (config dict, writer)."""
    cfg = {"model": {"type": "qwen2_vl", "path": str(tiny_model("qwen2_vl")), "dtype": "float32"},
           "calib": {"name": "custom_mm", "path": str(calib_dir), "n_samples": 2, "bs": 2, "seq_len": 256},
           "quant": {"method": "RTN", "weight": {"bit": 4, "group_size": 32}},
           "save": {"save_path": str(tmp_path / "out"), "save_fake": True}}
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's own file")

    def write(c: dict) -> Path:
        f = folder / "job.yml"
        f.write_text(yaml.safe_dump(c))
        return f
    return cfg, write


def _refused(capsys, args: list[str], *patterns: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    for p in patterns:
        assert p in err, err
    return err


@pytest.mark.parametrize("where", ["config_folder", "calib_folder", "inside_model", "contains_model", "cwd",
                                   "eval_data", "load_scales"])
def test_save_path_over_user_data_is_refused_before_any_work(job, tmp_path, calib_dir, capsys, monkeypatch, where):
    cfg, write = job
    model = Path(cfg["model"]["path"])
    cfg_folder = tmp_path / "cfg"
    if where == "eval_data":
        eval_dir = tmp_path / "mme"
        eval_dir.mkdir()
        cfg["eval"] = {"eval_pos": ["fake_quant"], "name": "mme", "path": str(eval_dir), "fidelity_samples": 0}
    if where == "load_scales":
        (tmp_path / "scales").mkdir()
        (tmp_path / "scales" / "awq_records.pt").write_bytes(b"not read")
        cfg["quant"] = {"method": "AWQ", "special": {"load_scales": str(tmp_path / "scales" / "awq_records.pt")}}
    save, key = {"config_folder": (cfg_folder, "the config file's folder"), "calib_folder": (calib_dir, "calib.path"),
                 "inside_model": (model / "q", "model.path"), "contains_model": (model.parent, "model.path"),
                 "cwd": (tmp_path, "the current working directory"), "eval_data": (tmp_path / "mme", "eval.path"),
                 "load_scales": (tmp_path / "scales", "quant.special.load_scales")}[where]
    monkeypatch.chdir(tmp_path)
    cfg["save"]["save_path"] = str(save)
    f = write(cfg)
    watched = {p: tree_digest(p) for p in (cfg_folder, calib_dir, model.parent, tmp_path / "scales") if p.exists()}
    _refused(capsys, [str(f), "--overwrite"], "save.save_path:", str(save), key)
    assert {p: tree_digest(p) for p in watched} == watched


def test_overwrite_replaces_only_llmc_outputs(job, tmp_path, capsys):
    cfg, write = job
    f = write(cfg)
    mine = tmp_path / "out"
    mine.mkdir()
    (mine / "thesis.tex").write_text("not llmc's")
    before = tree_digest(mine)
    _refused(capsys, [str(f), "--overwrite"], "is not an llmc output folder", MARKER)
    assert tree_digest(mine) == before
    (mine / "thesis.tex").unlink()
    mine.rmdir()
    assert main([str(f)]) == 0
    first = read_marker(mine)
    assert first["status"] == "complete" and "fake" in first["outputs"]
    _refused(capsys, [str(f)], "already exists")  # no --overwrite: refused
    assert main([str(f), "--overwrite"]) == 0  # an llmc output: replaced
    assert read_marker(mine)["time"] >= first["time"] and (mine / "fake" / "config.json").is_file()


def _run_cli(cfg_file: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "llmc", str(cfg_file), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_killed_run_leftovers_are_removed_by_the_next_run(job, tmp_path):
    cfg, write = job
    cfg["quant"] = {"method": "GPTQ", "weight": {"bit": 4, "group_size": 32}}
    f = write(cfg)
    proc = _run_cli(f)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    leftovers = list(tmp_path.glob(".out.tmp-*"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert leftovers and all(p.exists() for p in leftovers), "the run ended before it could be killed"
    foreign = tmp_path / ".out.tmp-foreign"  # not llmc's (no marker): never touched
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    run = _run_cli(f)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-2000:]
    assert not any(p.exists() for p in leftovers)
    assert (foreign / "keep.txt").read_text() == "x"
    assert "left behind by an earlier run that was killed" in (tmp_path / "out" / "llmc.log").read_text()


def test_running_jobs_temp_folder_is_not_removed(tmp_path):
    from llmc.export.atomic import new_temp, remove_stale_temps

    alive = new_temp(tmp_path / "out")  # marker names this (live) process
    assert remove_stale_temps(tmp_path / "out") == [] and alive.exists()


def test_temp_folder_appears_only_with_its_marker(tmp_path, monkeypatch):
    """A run killed while its temp folder is being made leaves no unmarked ``.tmp-`` folder (which no
    later run could recognise), and a marked ``.init-`` folder of a dead process is removed."""
    from llmc.export import atomic

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies between mkdir and the marker
    with monkeypatch.context() as m:
        m.setattr(atomic, "write_marker", killed)
        with pytest.raises(KeyboardInterrupt):
            atomic.new_temp(tmp_path / "out")
    assert not list(tmp_path.glob(".out.tmp-*")) and len(list(tmp_path.glob(".out.init-*"))) == 1
    dead = tmp_path / ".out.init-deadbeef"
    dead.mkdir()
    atomic.write_marker(dead, "running")
    data = json.loads((dead / MARKER).read_text())
    (dead / MARKER).write_text(json.dumps({**data, "pid": 2**22 + 12345}))  # no such process
    assert atomic.remove_stale_temps(tmp_path / "out") == [dead] and not dead.exists()


def test_success_removes_the_failed_log_of_an_earlier_failure(job, tmp_path, capsys, monkeypatch):
    import llmc.runner as runner

    cfg, write = job
    f = write(cfg)

    def boom(*a, **k):
        raise RuntimeError("simulated crash")
    monkeypatch.setattr(runner, "quantize_model", boom)
    assert main([str(f)]) == 1
    failed = tmp_path / "out.failed.log"
    assert "simulated crash" in failed.read_text() and not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert main([str(f)]) == 0
    assert not failed.exists()


def test_a_foreign_failed_log_is_never_touched(job, tmp_path):
    cfg, write = job
    f = write(cfg)
    theirs = tmp_path / "out.failed.log"
    theirs.write_text("the user's file")
    assert main([str(f)]) == 0
    assert theirs.read_text() == "the user's file"


def test_failure_after_exports_keeps_them(job, tmp_path, capsys, monkeypatch):
    from llmc.eval.job import JobEvaluation

    cfg, write = job
    cfg["save"]["save_vllm"] = True
    f = write(cfg)

    def eval_crash(self):
        raise RuntimeError("evaluation crashed")
    monkeypatch.setattr(JobEvaluation, "after_quant", eval_crash)
    assert main([str(f)]) == 1
    err = capsys.readouterr().err
    assert "step 'evaluate after quantization' failed" in err and "fake, vllm" in err
    out = tmp_path / "out"
    marker = read_marker(out)
    assert marker["status"] == "failed" and marker["failed_step"] == "evaluate after quantization"
    assert marker["outputs"] == ["fake", "vllm"]
    for folder in ("fake", "vllm"):
        assert (out / folder / "config.json").is_file() and (out / folder / "model.safetensors").is_file()
    assert "evaluation crashed" in (tmp_path / "out.failed.log").read_text()
    assert json.loads((out / "vllm" / "config.json").read_text())["quantization_config"]
