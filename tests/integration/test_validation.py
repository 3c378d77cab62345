"""A training flow on a Prefect server stops at validation on bad data (detectors and expectations: tests/unit/test_validation.py)."""

import json
from pathlib import Path

import pytest

from tasks.validation import DataValidationError
from tests.conftest import write_jsonl


def test_flow_stops_before_training_on_bad_data(prefect_harness, tiny_config, tmp_path):
    from flows.training import training_flow

    rows = [json.loads(x) for x in Path(tiny_config.data.path).read_text().splitlines()]
    rows[0]["text"] += " SSN 123-45-6789"
    tiny_config.data.path = write_jsonl(tmp_path / "leaky.jsonl", rows)
    with pytest.raises(DataValidationError, match="ssn: 1 hit") as e:
        training_flow(config=tiny_config)
    assert "leaky.jsonl:1" in str(e.value) and "report: " in str(e.value)
    state = Path(tiny_config.state_dir)
    assert not (state / "models").exists()  # validation runs before the model is resolved (built) at all
    from llmops.governance.policy import load_governance

    assert not (state / "runs").exists() and not Path(load_governance().ledger).exists()
    assert not (state / "data").exists()  # not even the splits were written
