"""S3 target credentials against a real S3-compatible server (directory targets and failures: tests/unit/test_targets.py)."""

import boto3
import pytest

from tasks.promotion import S3Target, file_manifest, make_target
from tests.conftest import S3_KEY, S3_SECRET
from tests.unit.test_targets import _creds_file, _model, _no_aws_env  # noqa: F401


def test_s3_credentials_come_from_the_target_spec(s3_server, tmp_path, monkeypatch):
    from botocore.exceptions import NoCredentialsError

    _no_aws_env(monkeypatch, tmp_path)
    boto3.client("s3", endpoint_url=s3_server, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET).create_bucket(
        Bucket="llmops-creds"
    )
    src = _model(tmp_path / "src")
    man = file_manifest(src, "m", "3")
    with pytest.raises(NoCredentialsError):  # the environment really holds no keys
        S3Target("s3://llmops-creds/p", s3_server).read_manifest("m", "3")
    creds = _creds_file(
        tmp_path / "credentials",
        f"""
        [other]
        aws_access_key_id = wrong
        [default]
        aws_access_key_id = {S3_KEY}
        aws_secret_access_key = {S3_SECRET}
        """,
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-must-not-be-used")  # the spec wins over the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-must-not-be-used")
    target = make_target("s3", "s3://llmops-creds/p", s3_server, None, credentials_file=creds)
    assert target.publish(src, man) == {"target": "s3://llmops-creds/p", "skipped": False, "files": 4}
    target.point_current("m", "3")
    assert target.read_manifest("m", "3") == man and target.publish(src, man)["skipped"] is True
    assert S3_SECRET not in repr(target)
