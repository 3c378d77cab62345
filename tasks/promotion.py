"""Promotion targets: publishing a verified version and moving MLflow aliases (evidence: llmops/governance/evidence.py).

Targets implement one small protocol (`Target`). Every target writes the model files first and the
`manifest.json` (file list + sha256 of each file) *last*, so a reader that looks for the manifest never sees a
partial model; re-publishing a version whose manifest already matches is a no-op (idempotent).

Directory targets (`DirTarget`, `EdgeTarget`) hold `<root>/<model>/<version>/` and `<root>/<model>/current.json`
(the version readers should use). A publish never deletes a version directory before its replacement is in place:
1. debris of publishes whose process died (SIGKILL, OOM, power loss) is cleaned first (`clean_debris`);
2. the files are copied into `<root>/<model>/.tmp-<pid>-<uuid>` (same filesystem, so renames are atomic), each
   copied file is hashed once and compared with the source manifest, the manifest is written last, all fsynced;
3. a new version is renamed into place. An existing one is swapped atomically with Linux
   `renameat2(RENAME_EXCHANGE)`; where the filesystem lacks it (NFS) the old copy is renamed to
   `.old-<pid>-<uuid>-<version>`, the new one renamed into place, and on any error the old one renamed back;
4. the replaced copy (now in `.tmp-*` or `.old-*`) is removed.
So `current.json` always names a complete directory, except after a crash between the two renames of step 3
without RENAME_EXCHANGE: then `<version>` is missing and `.old-<pid>-<uuid>-<version>` beside it tells a reader
where the complete copy is; the next publish (`clean_debris`) renames it back.
Debris names: `.tmp-<pid>-<uuid>` and `.old-<pid>-<uuid>-<version>`, `<pid>` being the publishing process.
`clean_debris` touches only those whose pid is not alive on this host, never a live publish's.

S3 credentials come from the target's spec (`credentials_file`, an AWS shared-credentials INI read by the worker),
not from the process environment, so a worker can hold a different key per target.
"""

from __future__ import annotations

import base64
import configparser
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmops.errors import PromotionError

MANIFEST = "manifest.json"
POINTER = "current.json"
PART_SIZE = 8 * 1024 * 1024  # multipart part size; also used to recompute composite checksums


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(src: Path, model_name: str, version: str, extra: dict | None = None) -> dict:
    files = {
        f.relative_to(src).as_posix(): {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        for f in sorted(p for p in src.rglob("*") if p.is_file())
    }
    return {"model": model_name, "version": str(version), "files": files, **(extra or {})}


# --------------------------------------------------------------------------------------------------- targets


class Target(Protocol):
    name: str

    def publish(self, src: Path, manifest: dict) -> dict: ...

    def read_manifest(self, model_name: str, version: str) -> dict | None: ...

    def point_current(self, model_name: str, version: str) -> None: ...

    def read_current(self, model_name: str) -> str | None: ...


def _retry(fn, what: str, attempts: int = 4, base: float = 0.5):
    from botocore.exceptions import BotoCoreError, ClientError

    for i in range(attempts):
        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""
            permanent = code in (
                "AccessDenied",
                "NoSuchBucket",
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "BadDigest",
                "InvalidRequest",
            )
            if permanent or i == attempts - 1:
                raise PromotionError(
                    f"{what} failed: {type(e).__name__}: {str(e)[:200]}",
                    what,
                    "check the target's credentials, bucket and network; re-run to resume",
                ) from e
            time.sleep(base * 2**i)


def composite_sha256(path: Path, part_size: int) -> str:
    """The S3 checksum of a multipart upload: sha256 over the parts' sha256 digests, then '-<parts>'."""
    digests, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(part_size), b""):
            digests.update(hashlib.sha256(chunk).digest())
            n += 1
    return f"{base64.b64encode(digests.digest()).decode()}-{n}"


def read_s3_credentials(path: str | Path) -> dict:
    """boto3 client keyword arguments from an AWS shared-credentials INI file's [default] section."""
    where = str(path)
    fix = (
        "give the promotion worker a readable AWS shared-credentials file with aws_access_key_id and "
        "aws_secret_access_key under [default], or fix the target's credentials_file"
    )
    ini = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            ini.read_file(f)
    except OSError as e:
        raise PromotionError(
            f"cannot read the S3 credentials file ({e.strerror or type(e).__name__})", where, fix
        ) from None
    except (configparser.Error, UnicodeDecodeError) as e:  # the message could quote a secret: name the kind only
        raise PromotionError(f"the S3 credentials file is not an INI file ({type(e).__name__})", where, fix) from None
    if not ini.has_section("default"):
        raise PromotionError("the S3 credentials file has no [default] section", where, fix)
    section = ini["default"]
    keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    creds = {k: section[k].strip() for k in keys if section.get(k, "").strip()}
    missing = [k for k in keys[:2] if k not in creds]
    if missing:
        raise PromotionError(f"the S3 credentials file has no {' / '.join(missing)} in [default]", where, fix)
    return creds


@dataclass
class S3Target:
    """s3://bucket/prefix/<model>/<version>/... via boto3 (AWS S3 or any S3-compatible endpoint)."""

    uri: str
    endpoint_url: str | None = None
    sse: str | None = None  # "AES256" or "aws:kms" where the store supports it
    credentials_file: str | Path | None = None  # None = boto3's default chain (env, ~/.aws, instance role)
    name: str = "s3"

    def __post_init__(self) -> None:
        if not self.uri.startswith("s3://"):
            raise PromotionError(f"not an s3:// URI: {self.uri}", "promotion.targets[].uri", "use s3://bucket/prefix")
        self.bucket, _, self.prefix = self.uri[5:].partition("/")
        self.prefix = self.prefix.strip("/")
        if self.credentials_file is not None:
            read_s3_credentials(self.credentials_file)  # fail before any upload; the secrets are not kept on self

    def _client(self):
        import boto3
        from botocore.config import Config

        creds = read_s3_credentials(self.credentials_file) if self.credentials_file is not None else {}
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            **creds,
            config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10, read_timeout=60),
        )

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def read_manifest(self, model_name: str, version: str) -> dict | None:
        s3 = self._client()
        try:
            body = s3.get_object(Bucket=self.bucket, Key=self._key(model_name, str(version), MANIFEST))["Body"]
            return json.loads(body.read())
        except s3.exceptions.NoSuchKey:
            return None

    def publish(self, src: Path, manifest: dict) -> dict:
        from boto3.s3.transfer import TransferConfig

        model, version = manifest["model"], manifest["version"]
        if self.read_manifest(model, version) == manifest and self._objects_match(src, model, version, manifest):
            return {"target": self.uri, "skipped": True}  # every object's checksum verified now, nothing extra
        s3 = self._client()
        cfg = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
        extra = {"ChecksumAlgorithm": "SHA256"} | ({"ServerSideEncryption": self.sse} if self.sse else {})
        for rel, meta in manifest["files"].items():
            key, path = self._key(model, version, rel), src / rel
            _retry(lambda: s3.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=cfg), f"upload {key}")
            self._verify(s3, key, path, meta)
        body = json.dumps(manifest, indent=2).encode()
        _retry(
            lambda: s3.put_object(
                Bucket=self.bucket,
                Key=self._key(model, version, MANIFEST),
                Body=body,
                ChecksumAlgorithm="SHA256",
                **({"ServerSideEncryption": self.sse} if self.sse else {}),
            ),
            "write manifest",
        )
        return {"target": self.uri, "skipped": False, "files": len(manifest["files"])}

    def _objects_match(self, src: Path, model: str, version: str, manifest: dict) -> bool:
        """Exactly the manifest's objects under the version prefix, each with its size and SHA-256 checksum (a
        planted manifest beside other bytes is republished over, not skipped)."""
        s3 = self._client()
        prefix = self._key(model, str(version)) + "/"
        keys, token = set(), None
        while True:
            page = s3.list_objects_v2(
                Bucket=self.bucket, Prefix=prefix, **({"ContinuationToken": token} if token else {})
            )
            keys.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
            token = page.get("NextContinuationToken")
            if not token:
                break
        if keys - {MANIFEST} != set(manifest["files"]):
            return False
        for rel, meta in manifest["files"].items():
            head = s3.head_object(Bucket=self.bucket, Key=prefix + rel, ChecksumMode="ENABLED")
            expected = {
                base64.b64encode(bytes.fromhex(meta["sha256"])).decode(),
                composite_sha256(src / rel, PART_SIZE),
            }
            if head["ContentLength"] != meta["bytes"] or head.get("ChecksumSHA256") not in expected:
                return False
        return True

    def _verify(self, s3, key: str, path: Path, meta: dict) -> None:
        head = _retry(lambda: s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"), f"verify {key}")
        got = head.get("ChecksumSHA256")
        single = base64.b64encode(bytes.fromhex(meta["sha256"])).decode()
        expected = {single, composite_sha256(path, PART_SIZE)}
        if head["ContentLength"] != meta["bytes"] or (got and got not in expected):
            raise PromotionError(
                f"checksum mismatch after upload ({got})",
                f"s3://{self.bucket}/{key}",
                "re-run the promotion; the manifest was not written",
            )

    def read_current(self, model_name: str) -> str | None:
        s3 = self._client()
        try:
            body = s3.get_object(Bucket=self.bucket, Key=self._key(model_name, POINTER))["Body"]
            return str(json.loads(body.read()).get("version"))
        except s3.exceptions.NoSuchKey:
            return None

    def point_current(self, model_name: str, version: str) -> None:
        body = json.dumps({"model": model_name, "version": str(version)}).encode()
        _retry(
            lambda: self._client().put_object(Bucket=self.bucket, Key=self._key(model_name, POINTER), Body=body),
            "write current pointer",
        )


class TargetTampered(PromotionError):
    """Something under a target root is not what the publisher made (a symlink, a planted directory)."""


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _safe_component(name: str, what: str) -> str:
    if not _SAFE.fullmatch(str(name)) or name in (".", ".."):
        raise PromotionError(f"{what} {name!r} is not a safe directory name", what, "use letters, digits, . _ -")
    return str(name)


def _open_dir(path: Path, create: bool = False) -> int:
    """An fd of the real directory `path` (never through a symlink, at any component below the target root)."""
    try:
        return os.open(path, _O_DIR)
    except FileNotFoundError:
        if not create:
            raise
        os.mkdir(path, 0o755)
        return os.open(path, _O_DIR)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise TargetTampered(
                f"{path} is a symlink or not a directory: publishing never follows links under a target root",
                str(path),
                "an admin inspects and removes it; nothing was written",
            ) from e
        raise


def _lstat_kind(dfd: int, name: str) -> str | None:
    import stat

    try:
        st = os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "other"


def _copy_tree_at(src: Path, dfd: int, manifest: dict) -> None:
    """Copy the manifest's files from `src` into the directory `dfd` with openat-style calls: every component is
    opened O_NOFOLLOW relative to its parent's fd and files are created O_EXCL, so a symlink planted (or raced in)
    under the target cannot redirect a write. Each file is hashed once, as written, against the manifest."""
    for rel, meta in manifest["files"].items():
        parts = rel.split("/")
        fds = [dfd]
        try:
            for part in parts[:-1]:
                try:
                    os.mkdir(part, 0o755, dir_fd=fds[-1])
                except FileExistsError:
                    pass
                fds.append(os.open(part, _O_DIR, dir_fd=fds[-1]))
            out = os.open(parts[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=fds[-1])
            with os.fdopen(out, "wb") as fout:
                digest, n = _copy_file(src / rel, fout)
            if {"sha256": digest, "bytes": n} != {"sha256": meta["sha256"], "bytes": meta["bytes"]}:
                raise PromotionError(
                    "copied file differs from the source manifest",
                    str(src / rel),
                    "check the disk and that the source model did not change; re-run the promotion",
                )
        finally:
            for fd in fds[1:]:
                os.close(fd)


def _tree_matches_at(hfd: int, name: str, manifest: dict) -> bool:
    """Whether the version directory `name` under `hfd` holds exactly the manifest's files (plus the manifest) with
    their sha256 and sizes, and nothing else; walked without following any link. A manifest alone proves nothing:
    it is predictable from public data, and anyone with write access to the target can plant one beside other bytes."""
    import stat

    want = dict(manifest["files"])
    seen: set[str] = set()

    def walk(dfd: int, prefix: str) -> bool:
        for entry in os.listdir(dfd):
            rel = f"{prefix}{entry}"
            st = os.lstat(entry, dir_fd=dfd)
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(entry, _O_DIR, dir_fd=dfd)
                try:
                    if not walk(sub, rel + "/"):
                        return False
                finally:
                    os.close(sub)
                continue
            if not stat.S_ISREG(st.st_mode):
                return False
            if rel == MANIFEST:
                continue
            meta = want.get(rel)
            if meta is None or st.st_size != meta["bytes"]:
                return False
            fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
            h = hashlib.sha256()
            with os.fdopen(fd, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != meta["sha256"]:
                return False
            seen.add(rel)
        return True

    try:
        vfd = os.open(name, _O_DIR, dir_fd=hfd)
    except OSError:
        return False
    try:
        return walk(vfd, "") and seen == set(want)
    finally:
        os.close(vfd)


def _copy_file(src: Path, fout) -> tuple[str, int]:
    """Copy one file into the open `fout`, hashing the bytes as they are written (once); fsynced."""
    h, n = hashlib.sha256(), 0
    with open(src, "rb") as fin:
        for chunk in iter(lambda: fin.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
            fout.write(chunk)
    fout.flush()
    os.fsync(fout.fileno())
    return h.hexdigest(), n


def _rename_at(dfd: int, a: str, b: str) -> None:
    os.rename(a, b, src_dir_fd=dfd, dst_dir_fd=dfd)


def _write_at(dfd: int, name: str, body: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=dfd)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())


def _default_journal():
    from llmops.governance.policy import load_governance
    from llmops.governance.store import GovernanceStore

    return GovernanceStore(load_governance().state_db)


@dataclass
class DirTarget:
    """A filesystem/NFS directory: copy into a temp dir on the same filesystem, then rename-swap (module docstring).
    Nothing below the root is ever followed through a symlink; the only names renamed or removed are those this
    publisher recorded in the worker's journal (governance store) before creating them."""

    uri: str
    name: str = "onprem"
    journal: object = None  # llmops.governance.store.GovernanceStore; None = this process's governance store

    def __post_init__(self) -> None:
        self.root = Path(self.uri.removeprefix("file://"))
        if isinstance(self.journal, (str, Path)):
            from llmops.governance.store import GovernanceStore

            self.journal = GovernanceStore(self.journal)

    def _journal(self):
        if self.journal is None:
            self.journal = _default_journal()
        return self.journal

    def _home_fd(self, model_name: str, create: bool = False) -> int:
        _safe_component(model_name, "model name")
        if self.root.is_symlink():
            raise TargetTampered(
                f"target root {self.root} is a symlink",
                str(self.root),
                "an admin points the target at the real directory (llmops governance target)",
            )
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        rfd = _open_dir(self.root)
        try:
            try:
                return os.open(model_name, _O_DIR, dir_fd=rfd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(model_name, 0o755, dir_fd=rfd)
                return os.open(model_name, _O_DIR, dir_fd=rfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise TargetTampered(
                        f"{self.root / model_name} is a symlink or not a directory: publishing "
                        "never follows links under a target root",
                        str(self.root / model_name),
                        "an admin inspects and removes it; nothing was written",
                    ) from None
                raise
        finally:
            os.close(rfd)

    def read_manifest(self, model_name: str, version: str) -> dict | None:
        try:
            hfd = self._home_fd(model_name)
        except FileNotFoundError:
            return None
        try:
            if _lstat_kind(hfd, _safe_component(str(version), "version")) != "dir":
                return None
            vfd = os.open(str(version), _O_DIR, dir_fd=hfd)
            try:
                fd = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=vfd)
            except OSError:
                return None
            finally:
                os.close(vfd)
            with os.fdopen(fd, "rb") as f:
                return json.loads(f.read())
        finally:
            os.close(hfd)

    def read_current(self, model_name: str) -> str | None:
        """The version `current.json` names (None if none); a symlinked pointer is tampering."""
        try:
            hfd = self._home_fd(model_name)
        except FileNotFoundError:
            return None
        try:
            kind = _lstat_kind(hfd, POINTER)
            if kind is None:
                return None
            if kind == "link":
                raise TargetTampered(
                    f"{self.root / model_name / POINTER} is a symlink",
                    str(self.root / model_name),
                    "an admin removes it; the next promotion rewrites the pointer",
                )
            with os.fdopen(os.open(POINTER, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=hfd), "rb") as f:
                return str(json.loads(f.read()).get("version"))
        finally:
            os.close(hfd)

    def publish(self, src: Path, manifest: dict) -> dict:
        model, version = manifest["model"], _safe_component(manifest["version"], "version")
        journal = self._journal()
        hfd = self._home_fd(model, create=True)
        home = self.root / model
        try:
            clean_debris(home, journal)  # may rename back a version dir a killed swap had moved aside
            kind = _lstat_kind(hfd, version)
            if kind not in (None, "dir"):
                raise TargetTampered(
                    f"{home / version} is a {'symlink' if kind == 'link' else 'non-directory'}, "
                    "not a version this publisher wrote",
                    str(home / version),
                    "an admin inspects and removes it; nothing was written",
                )
            if (
                kind == "dir"
                and self.read_manifest(model, version) == manifest
                and _tree_matches_at(hfd, version, manifest)
            ):
                return {"target": self.uri, "skipped": True}  # the very bytes, hashed now: an idempotent re-run
            tmp_name = f".tmp-{os.getpid()}-{uuid.uuid4().hex}"
            journal.record_debris(home / tmp_name, "tmp")
            replaced = None
            try:
                os.mkdir(tmp_name, 0o755, dir_fd=hfd)
                tfd = os.open(tmp_name, _O_DIR, dir_fd=hfd)
                try:
                    _copy_tree_at(src, tfd, manifest)
                    _write_at(tfd, MANIFEST, json.dumps(manifest, indent=2).encode())
                    os.fsync(tfd)
                finally:
                    os.close(tfd)
                replaced = _swap_in_at(hfd, home, tmp_name, version, journal)
                os.fsync(hfd)
            finally:
                for leftover in {tmp_name, replaced} - {None}:  # after an exchange, tmp holds the replaced copy
                    _remove_recorded(hfd, home, leftover, journal)
        finally:
            os.close(hfd)
        return {"target": self.uri, "skipped": False, "files": len(manifest["files"])}

    def point_current(self, model_name: str, version: str) -> None:
        hfd = self._home_fd(model_name, create=True)
        try:
            if _lstat_kind(hfd, POINTER) == "link":
                os.unlink(POINTER, dir_fd=hfd)  # never write through a planted link
            tmp = f".current-{os.getpid()}-{uuid.uuid4().hex}"
            _write_at(hfd, tmp, json.dumps({"model": model_name, "version": str(version)}).encode())
            _rename_at(hfd, tmp, POINTER)
            os.fsync(hfd)
        finally:
            os.close(hfd)


class EdgeTarget(DirTarget):
    """An edge bundle: the ONNX export + tokenizer + manifest, published like a directory target."""

    name = "edge"

    def publish(self, src: Path, manifest: dict) -> dict:
        if not any(rel.endswith(".onnx") for rel in manifest["files"]):
            raise PromotionError(
                "no .onnx file in the bundle",
                str(src),
                "enable compression.export_onnx so training produces an edge bundle",
            )
        return super().publish(src, manifest)


@dataclass
class ServeTarget:
    """A Ray Serve deployment on 127.0.0.1 (blue/green, llmops/serving/control.py). `publish` copies the model into
    the serving store like a directory target, brings the version up beside the one serving now and smoke-tests it
    against the evaluated figures in the manifest (`evaluated`); `point_current` switches traffic to it. A failed
    smoke test raises `SmokeTestFailed` from `publish`: no pointer moves, the old version keeps serving."""

    uri: str
    settings: object = None  # ServeSettings (governance target's `serve:`), None = defaults
    name: str = "serve"
    journal: object = None  # the worker's debris journal (see DirTarget)

    def __post_init__(self) -> None:
        from urllib.parse import urlparse

        from llmops.serving.control import serving_home
        from llmops.serving.settings import ServeSettings, resolve_cache

        u = urlparse(self.uri)
        if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost") or not u.port:
            raise PromotionError(
                f"serve target uri {self.uri!r} is not http://127.0.0.1:PORT",
                "targets[].uri",
                "serve on this host's loopback, e.g. http://127.0.0.1:8000",
            )
        # no cache backend named in governance: team mode's Redis when it runs for this state dir, else in-process
        base = resolve_cache(self.settings or ServeSettings(), serving_home().parent)
        self.settings = base.model_copy(update={"http_port": u.port})
        self.store = DirTarget(str(serving_home() / "models"), journal=self.journal)
        self.deployed: dict = {}

    def read_manifest(self, model_name: str, version: str) -> dict | None:
        return self.store.read_manifest(model_name, version)

    def read_current(self, model_name: str) -> str | None:
        return self.store.read_current(model_name)

    def publish(self, src: Path, manifest: dict) -> dict:
        from llmops.files import dir_digest
        from llmops.serving import control

        model, version = manifest["model"], manifest["version"]
        result = self.store.publish(src, manifest)
        model_dir = self.store.root / model / version
        control.connect(self.settings)
        control.start_serve(self.settings)
        self.deployed = control.rollout(
            model,
            version,
            model_dir,
            dir_digest(model_dir),
            self.settings,
            manifest.get("evaluated") or {},
            switch_traffic=False,
        )
        return {
            **result,
            "target": self.uri,
            "smoke": self.deployed.get("smoke"),
            "seconds": self.deployed.get("seconds"),
        }

    def point_current(self, model_name: str, version: str) -> None:
        from llmops.files import dir_digest
        from llmops.serving import control

        model_dir = self.store.root / model_name / str(version)
        control.connect(self.settings)
        control.finish_rollout(model_name, str(version), dir_digest(model_dir), self.settings)
        self.store.point_current(model_name, version)


def clean_debris(root: Path, journal=None) -> list[Path]:
    """Finish what killed publishes under `root` left, as the journal recorded it; return what was removed.

    Only names this publisher recorded before creating them are touched, never a name that merely looks like
    debris (a planted `.old-999999-…` stays where it is and is never renamed into place). A recorded `.old-*`
    whose version is missing (killed between the two renames of a swap) is the last complete copy: it is renamed
    back. Entries of live processes on this host are left alone; symlinks are never followed or renamed.
    """
    removed = []
    journal = journal or _default_journal()
    if not root.is_dir() or root.is_symlink():
        return removed
    hfd = _open_dir(root)
    try:
        for d in sorted(journal.debris_under(root), key=lambda d: str(d["path"])):
            name = d["path"].name
            kind = _lstat_kind(hfd, name)
            if kind is None:
                journal.forget_debris(d["path"])
                continue
            if kind != "dir":  # replaced by a link or a file after we recorded it: not ours any more
                journal.forget_debris(d["path"])
                continue
            if d["kind"] == "old" and d["final"] and _lstat_kind(hfd, d["final"]) is None:
                _rename_at(hfd, name, d["final"])
                journal.forget_debris(d["path"])
                continue
            _remove_recorded(hfd, root, name, journal)
            removed.append(d["path"])
    finally:
        os.close(hfd)
    return removed


AT_FDCWD, RENAME_EXCHANGE = -100, 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange_at(dfd: int, a: str, b: str) -> bool:
    """Atomically swap two existing entries of directory `dfd`; False where the OS or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(dfd, os.fsencode(a), dfd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _exchange(a: Path, b: Path) -> bool:  # kept for callers/tests that swap whole paths
    fd = _open_dir(a.parent)
    try:
        return _exchange_at(fd, a.name, b.name)
    finally:
        os.close(fd)


def _swap_in_at(hfd: int, home: Path, new: str, final: str, journal) -> str | None:
    """Put the complete dir `new` at `final` (entries of `home`, opened as `hfd`), never deleting `final` first;
    return the name the replaced copy now has (recorded in the journal), or None."""
    if _lstat_kind(hfd, final) is None:
        _rename_at(hfd, new, final)
        journal.forget_debris(home / new)
        return None
    if _exchange(home / new, home / final):
        return new  # still recorded as debris: now the replaced copy
    old = f".old-{os.getpid()}-{uuid.uuid4().hex}-{final}"
    journal.record_debris(home / old, "old", final)
    _rename_at(hfd, final, old)
    try:
        _rename_at(hfd, new, final)
    except BaseException:
        _rename_at(hfd, old, final)
        journal.forget_debris(home / old)
        raise
    journal.forget_debris(home / new)
    return old


def _remove_recorded(hfd: int, home: Path, name: str, journal) -> None:
    """Remove a directory this publisher recorded (best effort: what stays is still recorded for the next run).
    shutil.rmtree with dir_fd never follows symlinks inside it."""
    if _lstat_kind(hfd, name) == "dir":
        try:
            shutil.rmtree(name, dir_fd=hfd)
        except OSError:
            return
    journal.forget_debris(home / name)


def make_target(
    kind: str,
    uri: str,
    endpoint_url: str | None = None,
    sse: str | None = None,
    credentials_file: str | Path | None = None,
    serve=None,
    journal=None,
) -> Target:
    if kind == "s3" or (kind == "onprem" and uri.startswith("s3://")):
        return S3Target(uri, endpoint_url, sse, credentials_file=credentials_file, name=kind)
    if kind == "onprem":
        return DirTarget(uri, journal=journal)
    if kind == "edge":
        return EdgeTarget(uri, journal=journal)
    if kind == "serve":
        return ServeTarget(uri, serve, journal=journal)
    raise PromotionError(f"unknown target kind '{kind}'", "promotion.targets[].kind", "use s3, onprem, edge or serve")


# ---------------------------------------------------------------------------------------------- registry side


def move_production_alias(client, model_name: str, version: str) -> str | None:
    """production → version, previous → the old production (if any). Returns the old production version."""
    from mlflow.exceptions import MlflowException

    try:
        old = str(client.get_model_version_by_alias(model_name, "production").version)
    except MlflowException:
        old = None
    if old and old != str(version):
        client.set_registered_model_alias(model_name, "previous", old)
    client.set_registered_model_alias(model_name, "production", str(version))
    return old
