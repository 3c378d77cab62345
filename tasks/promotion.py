"""Promotion: evidence checks, publishing to targets, and moving MLflow aliases.

Targets implement one small protocol (`Target`). Every target writes the model files first and the
`manifest.json` (file list + sha256 of each file) *last*, so a reader that looks for the manifest never sees a
partial model; re-publishing a version whose manifest already matches is a no-op (idempotent).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmops.errors import LLMOpsError
from llmops.files import write_text_atomic

MANIFEST = "manifest.json"
POINTER = "current.json"
PART_SIZE = 8 * 1024 * 1024  # multipart part size; also used to recompute composite checksums


class PromotionError(LLMOpsError):
    """A promotion cannot proceed."""


# ------------------------------------------------------------------------------------------------- evidence


def check_evidence(version_tags: dict) -> list[str]:
    """Problems that forbid promotion (empty = promotable). Pure: reads the lineage tags set at registration."""
    problems = []
    if version_tags.get("llmops.validation") not in ("passed", "not-run"):
        problems.append(f"data validation: {version_tags.get('llmops.validation', 'missing')}")
    if not version_tags.get("llmops.gate", "").startswith("passed"):
        problems.append(f"evaluation gate: {version_tags.get('llmops.gate', 'missing')}")
    if version_tags.get("llmops.dp.private") != "True":
        problems.append("model was not trained with differential privacy")
    try:
        spent = float(version_tags["llmops.dp.epsilon_cumulative"])
        budget = float(version_tags["llmops.dp.budget"])
        if spent > budget:
            problems.append(f"dataset epsilon {spent:.3f} exceeds budget {budget:.3f}")
    except (KeyError, ValueError):
        problems.append("privacy tags missing (llmops.dp.epsilon_cumulative / llmops.dp.budget)")
    return problems


def file_manifest(src: Path, model_name: str, version: str, extra: dict | None = None) -> dict:
    files = {}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files[f.relative_to(src).as_posix()] = {"sha256": h.hexdigest(), "bytes": f.stat().st_size}
    return {"model": model_name, "version": str(version), "files": files, **(extra or {})}


# --------------------------------------------------------------------------------------------------- targets


class Target(Protocol):
    name: str

    def publish(self, src: Path, manifest: dict) -> dict: ...

    def read_manifest(self, model_name: str, version: str) -> dict | None: ...

    def point_current(self, model_name: str, version: str) -> None: ...


def _retry(fn, what: str, attempts: int = 4, base: float = 0.5):
    from botocore.exceptions import BotoCoreError, ClientError

    for i in range(attempts):
        try:
            return fn()
        except (BotoCoreError, ClientError, OSError) as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if isinstance(e, ClientError) else ""
            permanent = code in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                 "BadDigest", "InvalidRequest")
            if permanent or i == attempts - 1:
                raise PromotionError(f"{what} failed: {type(e).__name__}: {str(e)[:200]}", what,
                                     "check the target's credentials, bucket and network; re-run to resume") from e
            time.sleep(base * 2 ** i)


def composite_sha256(path: Path, part_size: int) -> str:
    """The S3 checksum of a multipart upload: sha256 over the parts' sha256 digests, then '-<parts>'."""
    digests, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(part_size), b""):
            digests.update(hashlib.sha256(chunk).digest())
            n += 1
    return f"{base64.b64encode(digests.digest()).decode()}-{n}"


@dataclass
class S3Target:
    """s3://bucket/prefix/<model>/<version>/... via boto3 (AWS S3 or any S3-compatible endpoint)."""

    uri: str
    endpoint_url: str | None = None
    sse: str | None = None  # "AES256" or "aws:kms" where the store supports it
    name: str = "s3"

    def __post_init__(self) -> None:
        if not self.uri.startswith("s3://"):
            raise PromotionError(f"not an s3:// URI: {self.uri}", "promotion.targets[].uri", "use s3://bucket/prefix")
        self.bucket, _, self.prefix = self.uri[5:].partition("/")
        self.prefix = self.prefix.strip("/")

    def _client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url,
                            config=Config(retries={"mode": "standard", "max_attempts": 5}, connect_timeout=10,
                                          read_timeout=60))

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
        if self.read_manifest(model, version) == manifest:
            return {"target": self.uri, "skipped": True}
        s3 = self._client()
        cfg = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
        extra = {"ChecksumAlgorithm": "SHA256"} | ({"ServerSideEncryption": self.sse} if self.sse else {})
        for rel, meta in manifest["files"].items():
            key, path = self._key(model, version, rel), src / rel
            _retry(lambda: s3.upload_file(str(path), self.bucket, key, ExtraArgs=extra, Config=cfg), f"upload {key}")
            self._verify(s3, key, path, meta)
        body = json.dumps(manifest, indent=2).encode()
        _retry(lambda: s3.put_object(Bucket=self.bucket, Key=self._key(model, version, MANIFEST), Body=body,
                                     ChecksumAlgorithm="SHA256", **({"ServerSideEncryption": self.sse} if self.sse
                                                                    else {})), "write manifest")
        return {"target": self.uri, "skipped": False, "files": len(manifest["files"])}

    def _verify(self, s3, key: str, path: Path, meta: dict) -> None:
        head = _retry(lambda: s3.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"), f"verify {key}")
        got = head.get("ChecksumSHA256")
        single = base64.b64encode(bytes.fromhex(meta["sha256"])).decode()
        expected = {single, composite_sha256(path, PART_SIZE)}
        if head["ContentLength"] != meta["bytes"] or (got and got not in expected):
            raise PromotionError(f"checksum mismatch after upload ({got})", f"s3://{self.bucket}/{key}",
                                 "re-run the promotion; the manifest was not written")

    def point_current(self, model_name: str, version: str) -> None:
        body = json.dumps({"model": model_name, "version": str(version)}).encode()
        _retry(lambda: self._client().put_object(Bucket=self.bucket, Key=self._key(model_name, POINTER), Body=body),
               "write current pointer")


@dataclass
class DirTarget:
    """A filesystem/NFS directory: copy into a temp dir on the same filesystem, then atomic rename."""

    uri: str
    name: str = "onprem"

    def __post_init__(self) -> None:
        self.root = Path(self.uri.removeprefix("file://"))

    def read_manifest(self, model_name: str, version: str) -> dict | None:
        p = self.root / model_name / str(version) / MANIFEST
        return json.loads(p.read_text()) if p.is_file() else None

    def publish(self, src: Path, manifest: dict) -> dict:
        model, version = manifest["model"], manifest["version"]
        final = self.root / model / version
        if self.read_manifest(model, version) == manifest:
            return {"target": self.uri, "skipped": True}
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp)
            for rel, meta in manifest["files"].items():
                if file_manifest(tmp, model, version)["files"].get(rel) != meta:
                    raise PromotionError("copied file differs from source", str(tmp / rel), "check the disk")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
            _fsync_tree(tmp)
            if final.exists():  # an earlier, incomplete or different copy: replace it whole
                shutil.rmtree(final)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"target": self.uri, "skipped": False, "files": len(manifest["files"])}

    def point_current(self, model_name: str, version: str) -> None:
        write_text_atomic(self.root / model_name / POINTER, json.dumps({"model": model_name, "version": str(version)}))


class EdgeTarget(DirTarget):
    """An edge bundle: the ONNX export + tokenizer + manifest, published like a directory target."""

    name = "edge"

    def publish(self, src: Path, manifest: dict) -> dict:
        if not any(rel.endswith(".onnx") for rel in manifest["files"]):
            raise PromotionError("no .onnx file in the bundle", str(src),
                                 "enable compression.export_onnx so training produces an edge bundle")
        return super().publish(src, manifest)


def _fsync_tree(root: Path) -> None:
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def make_target(kind: str, uri: str, endpoint_url: str | None = None, sse: str | None = None) -> Target:
    if kind == "s3" or (kind == "onprem" and uri.startswith("s3://")):
        return S3Target(uri, endpoint_url, sse, name=kind)
    if kind == "onprem":
        return DirTarget(uri)
    if kind == "edge":
        return EdgeTarget(uri)
    raise PromotionError(f"unknown target kind '{kind}'", "promotion.targets[].kind", "use s3, onprem or edge")


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
