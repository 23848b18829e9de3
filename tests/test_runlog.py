"""--log-json (mlpipe/runlog.py): one JSON line per stage, flushed as the stage ends, an
error line for a failed run, and result.json unchanged by logging."""

from __future__ import annotations

import json
from pathlib import Path

from mlpipe.cli import main

DATA = Path(__file__).parent / "data"
SLEEP = str(DATA / "sleepstudy.parquet")
FORMULA = "Reaction ~ Days + (Days | Subject)"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fit_logs_every_stage_and_leaves_result_json_alone(tmp_path):
    log = tmp_path / "run.jsonl"
    assert main(["fit", SLEEP, "-f", FORMULA, "-q", "--residuals", "--out",
                 str(tmp_path / "a"), "--log-json", str(log)]) == 0
    assert main(["fit", SLEEP, "-f", FORMULA, "-q", "--residuals", "--out",
                 str(tmp_path / "b")]) == 0
    lines = _lines(log)
    assert [r["stage"] for r in lines] == ["prepare", "scan", "solve", "inference",
                                           "residuals", "write", "done"]
    scan = lines[1]
    assert scan["rows"] == 180 and scan["rows_used"] == 180 and scan["cells"] == 18
    assert scan["groups"] == {"Subject": 18}
    assert lines[2]["converged"] is True and lines[2]["evaluations"] > 0
    assert all(r["seconds"] >= 0 and r["peak_memory_mb"] > 0 for r in lines)
    peaks = [r["peak_memory_mb"] for r in lines]
    assert peaks == sorted(peaks)  # a high-water mark
    assert (tmp_path / "a" / "result.json").read_bytes() == \
        (tmp_path / "b" / "result.json").read_bytes()


def test_stats_and_a_failed_run_append_to_the_log(tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    assert main(["stats", SLEEP, "-f", FORMULA, "--out", str(tmp_path / "s.parquet"),
                 "--log-json", str(log)]) == 0
    assert main(["fit", SLEEP, "-f", "Reaction ~ Dayz + (1 | Subject)", "-q",
                 "--log-json", str(log)]) == 2
    stages = [r["stage"] for r in _lines(log)]
    assert stages == ["prepare", "scan", "write", "done", "error"]
    err = _lines(log)[-1]
    assert "'Dayz'" in err["message"] and "'Dayz'" in capsys.readouterr().err


def test_glmm_and_moments_fits_log_their_pass(tmp_path):
    """GLMM and moments fits log their own pass (scan: rows, cells — the covariate
    patterns, or the level pairs — and groups) before solve."""
    log = tmp_path / "run.jsonl"
    assert main(["fit", str(DATA / "glmm" / "cbpp.parquet"), "-f",
                 "cbind(incidence, failures) ~ period + (1 | herd)", "--family", "binomial",
                 "-q", "--log-json", str(log)]) == 0
    assert main(["fit", str(DATA / "penicillin.parquet"), "-f",
                 "diameter ~ 1 + (1 | plate) + (1 | sample)", "--moments", "-q",
                 "--log-json", str(log)]) == 0
    lines = _lines(log)
    assert [r["stage"] for r in lines] == ["scan", "solve", "done", "scan", "solve", "done"]
    assert lines[0]["rows_used"] == 56 and lines[0]["cells"] == 56
    assert lines[0]["groups"] == {"herd": 15}
    assert lines[3]["rows_used"] == 144 and lines[3]["groups"] == {"plate": 24, "sample": 6}
