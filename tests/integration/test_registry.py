"""MLflow registration against a real MLflow server on 127.0.0.1 (the sqlite-store tests are tests/unit/test_registry.py)."""

import pytest

from tests.unit.test_registry import _register, check_registered, load_by_alias_in_fresh_process, tiny_model_dir  # noqa: F401


@pytest.mark.integration
def test_register_round_trip_real_mlflow_server(tmp_path, tiny_model_dir, mlflow_server):
    out, uri = _register(tmp_path, tiny_model_dir, uri=mlflow_server)
    check_registered(uri, out)
    assert load_by_alias_in_fresh_process(uri)
