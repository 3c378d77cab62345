"""Cache policies: task results are reused when the *content* of their inputs and the task's source are unchanged.

Prefect's INPUTS policy hashes argument values; a path argument whose file changed would hit a stale entry, so
steps that read files key on the files' bytes (`files_key`). Results are persisted so a later run (another
process, another day) can reuse them. `PipelineConfig.use_cache: false` forces a refresh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

CONTENT = INPUTS + TASK_SOURCE  # no RUN_ID: reuse across flow runs


def hash_path(path: str | Path, h=None):
    """sha256 over (relative name, bytes) of a file or every file under a directory."""
    h = h or hashlib.sha256()
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.exists() else []
    for f in files:
        h.update(f.relative_to(p if p.is_dir() else p.parent).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h


def files_key(*paths_of) -> CachePolicy:
    """A policy keyed on task source + JSON of the inputs + the bytes of the files the inputs point at."""

    def key(ctx, inputs) -> str:
        h = hashlib.sha256()
        h.update((TASK_SOURCE.compute_key(ctx, inputs, {}) or "").encode())
        for name in sorted(inputs):
            v = inputs[name]
            h.update(
                name.encode() + b"=" + (v.model_dump_json() if hasattr(v, "model_dump_json") else repr(v)).encode()
            )
        for fn in paths_of:
            for p in fn(inputs):
                if p:
                    hash_path(p, h)
        return h.hexdigest()

    return CachePolicy.from_cache_key_fn(key)
