"""Directory and S3 targets under failure: rename-swap re-publish, debris of killed publishes, one hash per copied
file, S3 credentials from the target's spec.

    .venv/bin/python -m pytest tests/unit/test_targets.py -q
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import pytest

import tasks.promotion as promo
from llmops.errors import PromotionError
from tasks.promotion import MANIFEST, DirTarget, EdgeTarget, S3Target, clean_debris, file_manifest, make_target
from tests.conftest import ROOT


def _model(d: Path, n: int = 3, tag: str = "a") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (d / f"shard-{i:03d}.bin").write_bytes(f"{tag}-{i}".encode() * 1000)
    (d / "config.json").write_text(json.dumps({"tag": tag}))
    return d


def _complete(version_dir: Path) -> dict:
    """The version dir's manifest, after checking every file it lists against it (and nothing missing)."""
    man = json.loads((version_dir / MANIFEST).read_text())
    on_disk = file_manifest(version_dir, man["model"], man["version"])["files"]
    on_disk.pop(MANIFEST)
    assert on_disk == man["files"], f"{version_dir} does not match its manifest"
    return man


def _current(home: Path) -> dict:
    """What a reader sees: the manifest of the directory current.json points to, verified."""
    return _complete(home / json.loads((home / "current.json").read_text())["version"])


def _debris(home: Path) -> list[str]:
    return sorted(p.name for p in home.iterdir() if p.name.startswith((".tmp-", ".old-")))


@pytest.fixture
def published(tmp_path):
    """Version 1 published and current; a different source for the same version (e.g. approvals added)."""
    target = DirTarget(str(tmp_path / "onprem"))
    v1 = _model(tmp_path / "src-a", tag="a")
    man_a = file_manifest(v1, "m", "1")
    target.publish(v1, man_a)
    target.point_current("m", "1")
    v1b = _model(tmp_path / "src-b", tag="b")
    return target, tmp_path / "onprem" / "m", man_a, v1b, file_manifest(v1b, "m", "1", {"approved_by": ["bob"]})


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    """renameat2(RENAME_EXCHANGE) on local filesystems; two renames + roll-back where it is missing (NFS)."""
    if request.param == "two-renames":
        monkeypatch.setattr(promo, "_exchange", lambda a, b: False)
    elif promo._renameat2() is None:
        pytest.skip("no renameat2 in this libc")
    return request.param


# ------------------------------------------------------------------------------------------ 1. rename-swap


def test_republish_replaces_the_version_dir_whole(published, swap_mode):
    target, home, _, src_b, man_b = published
    assert target.publish(src_b, man_b)["skipped"] is False
    assert _current(home) == man_b and _debris(home) == []
    assert target.publish(src_b, man_b)["skipped"] is True  # idempotent


def test_rename_into_place_failing_keeps_the_old_version_complete(published, swap_mode, monkeypatch):
    """Today's code deletes the old dir, then renames: a failure (or crash) there leaves current.json dangling."""
    target, home, man_a, src_b, man_b = published
    real_rename = promo._rename_at

    def rename(dfd, a, b):
        if b == "1" and a.startswith(".tmp-"):
            raise OSError("crash while renaming into place")
        return real_rename(dfd, a, b)

    monkeypatch.setattr(promo, "_rename_at", rename)
    if swap_mode == "exchange":  # the exchange is one syscall: make that the step that fails
        monkeypatch.setattr(promo, "_exchange", lambda a, b: (_ for _ in ()).throw(OSError("crash in exchange")))
    with pytest.raises(OSError, match="crash"):
        target.publish(src_b, man_b)
    assert _current(home) == man_a and _debris(home) == []


def test_removing_the_replaced_copy_failing_leaves_the_new_version_complete(published, swap_mode, monkeypatch):
    target, home, _, src_b, man_b = published
    monkeypatch.setattr(promo, "_remove_recorded", lambda *a: (_ for _ in ()).throw(OSError("crash before removal")))
    with pytest.raises(OSError, match="crash before removal"):
        target.publish(src_b, man_b)
    assert _current(home) == man_b


CHILD = """
import os, shutil, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
import tasks.promotion as promo
from tasks.promotion import DirTarget, file_manifest

src, target_dir, marker, stage = sys.argv[1:5]
real_copy, copied = promo._copy_file, []

def slow_copy(s, fout):  # slow enough that the parent kills us mid-copy
    copied.append(s)
    if len(copied) == 5:
        Path(marker).write_text("copying")
    time.sleep(0.05)
    return real_copy(s, fout)

if stage == "mid-copy":
    promo._copy_file = slow_copy
if stage == "between-renames":  # no RENAME_EXCHANGE (NFS) and killed after moving the old copy aside
    promo._exchange = lambda a, b: False
    real_rename = promo._rename_at
    def rename(dfd, a, b):
        if a.startswith(".tmp-"):
            Path(marker).write_text("between")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(dfd, a, b)
    promo._rename_at = rename
man = file_manifest(Path(src), "m", "1", {{"approved_by": ["bob"]}})
DirTarget(target_dir).publish(Path(src), man)
"""


def _kill_publish(tmp_path: Path, src: Path, stage: str) -> int:
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT)))
    marker = tmp_path / f"marker-{stage}"
    child = subprocess.Popen(
        [sys.executable, str(script), str(src), str(tmp_path / "onprem"), str(marker), stage],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not marker.exists():
        assert child.poll() is None, child.stderr.read()[-2000:]
        assert time.time() < deadline, "child never reached the kill point"
        time.sleep(0.01)
    if stage == "mid-copy":
        os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return child.pid


# ------------------------------------------------------------------------------------------ 2. debris


def test_sigkill_mid_copy_then_rerun_leaves_no_debris(published, tmp_path):
    target, home, man_a, _, _ = published
    big = _model(tmp_path / "src-big", n=60, tag="big")
    pid = _kill_publish(tmp_path, big, "mid-copy")
    assert [d for d in _debris(home) if d.startswith(f".tmp-{pid}-")]  # the kill really left a half copy
    assert _current(home) == man_a  # readers were never affected
    man_big = file_manifest(big, "m", "1", {"approved_by": ["bob"]})
    assert target.publish(big, man_big)["skipped"] is False
    assert _debris(home) == [] and _current(home) == man_big


def test_sigkill_between_the_two_renames_is_repaired_by_the_next_publish(published, tmp_path):
    target, home, man_a, src_b, man_b = published
    pid = _kill_publish(tmp_path, src_b, "between-renames")
    assert not (home / "1").exists()  # the one window without RENAME_EXCHANGE; a reader can tell where it went:
    (old,) = [d for d in _debris(home) if d.startswith(".old-")]
    assert old.startswith(f".old-{pid}-") and old.endswith("-1") and _complete(home / old) == man_a
    assert target.publish(src_b, man_b)["skipped"] is False
    assert _debris(home) == [] and _current(home) == man_b


def test_clean_debris_touches_only_recorded_debris_of_dead_publishers(tmp_path):
    """Debris is recognised by the worker's journal, not by a name pattern: a planted `.old-999999-…-7` (attack:
    renamed into place as version 7) or a symlinked `.tmp-*` is never touched; recorded debris of a dead publisher
    is; a live publisher's is not."""
    from llmops.governance.store import GovernanceStore

    journal = GovernanceStore(tmp_path / "journal.sqlite")
    home = tmp_path / "m"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [
        f".tmp-{dead.pid}-ab12",
        f".old-{dead.pid}-cd34-7",
        ".old-999999-ffff-8",
        f".tmp-{dead.pid}-planted",
        "keep",
    ]
    for n in names:
        (home / n).mkdir(parents=True)
        (home / n / "f").write_text(n)
    (home / f".tmp-{dead.pid}-link").symlink_to(home / "keep")
    real_pid = os.getpid
    for n, kind, final in [
        (f".tmp-{dead.pid}-ab12", "tmp", ""),
        (f".old-{dead.pid}-cd34-7", "old", "7"),
        (f".tmp-{dead.pid}-link", "tmp", ""),
    ]:
        os.getpid = lambda: dead.pid  # recorded as the dead publisher's
        try:
            journal.record_debris(home / n, kind, final)
        finally:
            os.getpid = real_pid
    journal.record_debris(home / ".tmp-live-1", "tmp")  # this (live) process's own entry
    (home / ".tmp-live-1").mkdir()
    assert clean_debris(home, journal) == [home / f".tmp-{dead.pid}-ab12"]
    left = sorted(p.name for p in home.iterdir())
    assert left == sorted(
        {".old-999999-ffff-8", f".tmp-{dead.pid}-planted", "keep", "7", f".tmp-{dead.pid}-link", ".tmp-live-1"}
    )
    assert (home / "7" / "f").read_text() == f".old-{dead.pid}-cd34-7"  # the recorded swap was rolled back
    assert not (home / "8").exists() and (home / "keep" / "f").read_text() == "keep"
    assert clean_debris(tmp_path / "missing", journal) == []


def test_planted_old_dir_is_never_published_as_a_version(published, tmp_path):
    target, home, man_a, src_b, man_b = published
    evil = home / ".old-999999-0123abcd-2"
    evil.mkdir()
    (evil / "config.json").write_text("attacker's weights")
    target.publish(src_b, file_manifest(src_b, "m", "3"))
    assert not (home / "2").exists() and evil.exists()


def test_symlinks_under_the_target_root_are_never_followed(tmp_path):
    """Attacks: `<model>` symlinked elsewhere redirected the publish; a symlinked version dir left a permanent
    `.tmp-*` link. Now the publish is refused, nothing is written outside, no debris stays."""
    from tasks.promotion import TargetTampered

    src = _model(tmp_path / "src")
    man = file_manifest(src, "m", "1")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = tmp_path / "onprem"
    root.mkdir()
    (root / "m").symlink_to(elsewhere)
    with pytest.raises(TargetTampered, match="symlink"):
        DirTarget(str(root)).publish(src, man)
    assert list(elsewhere.iterdir()) == []
    (root / "m").unlink()
    (root / "m").mkdir()
    (root / "m" / "1").symlink_to(elsewhere)
    with pytest.raises(TargetTampered, match="symlink"):
        DirTarget(str(root)).publish(src, man)
    assert list(elsewhere.iterdir()) == [] and _debris(root / "m") == []
    (root / "m" / "1").unlink()
    (root / "m" / "current.json").symlink_to(elsewhere / "pointer")
    t = DirTarget(str(root))
    t.publish(src, man)
    t.point_current("m", "1")
    assert not (elsewhere / "pointer").exists() and not (root / "m" / "current.json").is_symlink()
    assert t.read_current("m") == "1" and _current(root / "m") == man


def test_failed_copy_leaves_nothing(published, monkeypatch):
    target, home, man_a, src_b, man_b = published
    (src_b / "config.json").write_text("changed after the manifest was computed")
    with pytest.raises(PromotionError, match="copied file differs from the source manifest"):
        target.publish(src_b, man_b)
    assert _debris(home) == [] and _current(home) == man_a


# ------------------------------------------------------------------------------------------ 3. hash once


@pytest.mark.parametrize("n", [1, 40])
def test_copy_verification_hashes_each_file_once(tmp_path, monkeypatch, n):
    src = _model(tmp_path / "src", n=n - 1)  # n - 1 shards + config.json
    man = file_manifest(src, "m", "1")  # the caller's source hashing, not counted
    calls = []
    real = promo._copy_file
    monkeypatch.setattr(promo, "_copy_file", lambda p, f: calls.append(Path(p).name) or real(p, f))
    monkeypatch.setattr(promo, "sha256_file", lambda p: (_ for _ in ()).throw(AssertionError("hashed twice")))
    DirTarget(str(tmp_path / "onprem")).publish(src, man)
    assert sorted(calls) == sorted(man["files"]) and len(calls) == n


# ------------------------------------------------------------------------------------------ 5. kept behaviour


def test_edge_target_still_needs_onnx_and_manifest_is_last(tmp_path, monkeypatch):
    src = _model(tmp_path / "src")
    with pytest.raises(PromotionError, match="no .onnx file"):
        EdgeTarget(str(tmp_path / "edge")).publish(src, file_manifest(src, "m", "1"))
    (src / "model.onnx").write_bytes(b"onnx")
    man, seen = file_manifest(src, "m", "1"), []
    real_write = promo._write_at

    def write_at(dfd, name, body):
        if name == MANIFEST:  # every listed file is already in place, byte for byte
            seen.append(file_manifest(Path(os.readlink(f"/proc/self/fd/{dfd}")), "m", "1")["files"])
        return real_write(dfd, name, body)

    monkeypatch.setattr(promo, "_write_at", write_at)
    assert EdgeTarget(str(tmp_path / "edge")).publish(src, man)["files"] == 5
    assert seen == [man["files"]] and _complete(tmp_path / "edge" / "m" / "1") == man


# ------------------------------------------------------------------------------------------ 4. S3 credentials


def _no_aws_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("AWS_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-such-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-such-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # a region is not a credential
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # an earlier test's session caches the env's keys


def _creds_file(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    "body,match",
    [
        (None, "cannot read the S3 credentials file"),
        ("dir", "cannot read the S3 credentials file"),
        ("[default]\naws_access_key_id = k\n", "no aws_secret_access_key in \\[default\\]"),
        ("[prod]\naws_access_key_id = k\naws_secret_access_key = s3cr3t-value\n", "no \\[default\\] section"),
        ("aws_secret_access_key = s3cr3t-value\n", "not an INI file"),
        ("[default]\naws_access_key_id = \naws_secret_access_key = s3cr3t-value\n", "no aws_access_key_id in"),
    ],
)
def test_bad_credentials_file_says_which_file_and_what_to_do(tmp_path, body, match):
    path = tmp_path / "credentials"
    if body == "dir":
        path.mkdir()
    elif body is not None:
        _creds_file(path, body)
    with pytest.raises(PromotionError, match=match) as e:
        make_target("s3", "s3://b/p", credentials_file=path)
    assert e.value.where == str(path) and "aws_access_key_id" in e.value.fix
    assert "s3cr3t-value" not in str(e.value)


def test_session_token_is_passed_to_boto3(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(boto3, "client", lambda *a, **kw: seen.update(kw))
    creds = _creds_file(
        tmp_path / "c", "[default]\naws_access_key_id=AK\naws_secret_access_key=SK\naws_session_token=TOK\n"
    )
    S3Target("s3://b/p", "http://127.0.0.1:1", credentials_file=str(creds))._client()
    assert (seen["aws_access_key_id"], seen["aws_secret_access_key"], seen["aws_session_token"]) == ("AK", "SK", "TOK")


# ------------------------------------------------------------------------- planted bytes behind a real manifest


def test_a_planted_or_tampered_version_dir_with_the_right_manifest_is_republished(tmp_path):
    """The manifest is predictable from public data; a dir holding it beside other bytes must not be 'skipped'."""
    target = DirTarget(str(tmp_path / "onprem"))
    src = _model(tmp_path / "src")
    man = file_manifest(src, "m", "3")
    planted = tmp_path / "onprem" / "m" / "3"
    _model(planted, tag="evil")  # other bytes, same names
    (planted / "BACKDOOR.txt").write_text("x")
    (planted / MANIFEST).write_text(json.dumps(man, indent=2))
    assert target.publish(src, man)["skipped"] is False
    assert _complete(planted) == man and not (planted / "BACKDOOR.txt").exists()
    assert target.publish(src, man)["skipped"] is True  # now the bytes are the manifest's: idempotent
    (planted / "shard-000.bin").write_bytes(b"flipped after publishing")
    assert target.publish(src, man)["skipped"] is False and _complete(planted) == man
    (planted / "extra.bin").write_bytes(b"an extra file")
    assert target.publish(src, man)["skipped"] is False and not (planted / "extra.bin").exists()


def test_a_pointer_on_a_target_the_log_never_published_to_is_a_divergence():
    from llmops.governance.audit import ReleaseState, release_divergences

    st = ReleaseState("m", ["1", "2"], {"onprem": "2"}, 5)
    assert release_divergences(st, {}, {"onprem": "2", "spare": None}) == []
    assert any("spare" in d for d in release_divergences(st, {}, {"onprem": "2", "spare": "2"}))


def test_release_decisions_for_one_model_are_serialised(tmp_path):
    import threading

    from llmops.governance.decision import release_lock
    from llmops.governance.policy import Governance

    g = Governance()
    g._path = tmp_path / "gov" / "governance.yaml"
    (tmp_path / "gov").mkdir()
    order = []

    def decide(tag, hold):
        with release_lock(g, "m"):
            order.append(f"{tag}-in")
            time.sleep(hold)
            order.append(f"{tag}-out")

    first = threading.Thread(target=decide, args=("a", 0.5))
    first.start()
    time.sleep(0.1)
    second = threading.Thread(target=decide, args=("b", 0))
    second.start()
    first.join()
    second.join()
    assert order == ["a-in", "a-out", "b-in", "b-out"]
