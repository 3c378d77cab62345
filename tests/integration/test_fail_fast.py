"""`llmops train` on bad data fails before the model, with one line, through a real Prefect run (tests/unit/test_fail_fast.py: the rest)."""

import json
from pathlib import Path

from tests.conftest import ROOT
from tests.unit.test_fail_fast import _bad_data, llmops  # noqa: F401


def test_train_on_bad_data_fails_before_the_model_with_one_line(tmp_path):
    home = tmp_path / "home"
    bad = _bad_data(tmp_path)
    r = llmops(
        "train",
        "--config",
        str(ROOT / "configs/tiny.yaml"),
        "--set",
        f"data.path={bad}",
        "--set",
        "data.max_records=null",
        home=home,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr  # once, as one line: no Prefect log echoes, no progress bar, no traceback
    assert lines[0].startswith(
        f"error: {bad}: data validation failed: ssn: 1 hit(s) in 1 record(s) (policy block) at bad.jsonl:5"
    )
    report = Path(lines[0].rsplit("report: ", 1)[1])
    assert report.is_file() and json.loads(report.read_text())["passed"] is False
    assert not (home / "models").exists()  # the tiny model was never built: validation came first
    assert "temporary server" not in r.stdout + r.stderr  # nor did Prefect start
    assert "123-45-6789" not in r.stdout + r.stderr
