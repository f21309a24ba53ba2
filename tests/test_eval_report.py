"""Report of evaluation positions: deltas and recovery by hand, files written."""
from __future__ import annotations

import json

from PIL import Image

from llmc.eval.report import markdown_table, score_rows, write_report


def mme(existence: float, count: float, commonsense: float) -> dict:
    return {"categories": {"existence": existence, "count": count, "commonsense_reasoning": commonsense},
            "perception": existence + count, "cognition": commonsense, "total": existence + count + commonsense}


RESULTS = {
    "pretrain": {"position": "pretrain", "tasks": {"mme_synth": mme(150.0, 0.0, 100.0)}},
    "transformed": {"position": "transformed", "tasks": {"mme_synth": mme(150.0, 50.0, 100.0)},
                    "fidelity": {"kl": 0.0, "top1_agreement": 1.0, "answer_agreement": 1.0}},
    "fake_quant": {"position": "fake_quant", "tasks": {"mme_synth": mme(100.0, 50.0, 125.0)},
                   "fidelity": {"kl": 0.25, "top1_agreement": 0.75, "answer_agreement": 0.5}},
}


def row(table: str, label: str) -> list[str]:
    line = next(x for x in table.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_cover_categories_and_sums():
    labels = [label for label, _ in score_rows(RESULTS)]
    assert labels == ["mme_synth/existence", "mme_synth/count", "mme_synth/commonsense_reasoning",
                      "mme_synth/perception", "mme_synth/cognition", "mme_synth/total"]


def test_table_deltas_and_recovery_by_hand():
    t = markdown_table(RESULTS)
    assert t.splitlines()[0] == ("| score | pretrain | transformed | Δ transformed | rec. transformed % | "
                                 "fake_quant | Δ fake_quant | rec. fake_quant % |")
    assert row(t, "mme_synth/existence") == ["mme_synth/existence", "150.00", "150.00", "0.00", "100.0",
                                             "100.00", "-50.00", "66.7"]
    # a zero baseline has no recovery
    assert row(t, "mme_synth/count") == ["mme_synth/count", "0.00", "50.00", "50.00", "n/a", "50.00", "50.00", "n/a"]
    assert row(t, "mme_synth/total")[5:] == ["275.00", "25.00", "110.0"]
    assert row(t, "fidelity/kl") == ["fidelity/kl", "—", "0.0000", "", "", "0.2500", "", ""]


def test_write_report_files(tmp_path, capsys):
    table = write_report(RESULTS, tmp_path / "rep")
    assert table in capsys.readouterr().out
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["baseline"] == "pretrain" and data["positions"] == ["pretrain", "transformed", "fake_quant"]
    assert data["results"]["fake_quant"]["fidelity"]["kl"] == 0.25
    assert table in (tmp_path / "rep" / "report.md").read_text()
    with Image.open(tmp_path / "rep" / "report.png") as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_baseline_is_first_position_without_pretrain():
    t = markdown_table({k: RESULTS[k] for k in ("transformed", "fake_quant")})
    assert t.splitlines()[0].startswith("| score | transformed | fake_quant | Δ fake_quant |")
