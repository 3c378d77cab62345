"""Small file helpers shared by the steps."""

from __future__ import annotations

import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to a hidden tmp file beside `path` (chmod `mode` first, if given), then rename it over `path`:
    readers see the old content or the new, never a half-written file or a secret file with loose permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        # created with its final mode: a secret is never readable by others, not even for an instant
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)  # umask may have removed bits the caller asked for
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (another user's counts as alive; a zombie, which has
    exited and only waits to be reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process / not a pid we could have written
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def exclusive_lock(path: str | Path, mode: int = 0o644):
    """Hold an exclusive flock on `path` (created if missing, never through a symlink) for the `with` block: the one
    way processes sharing a state or governance dir take turns (model builds, GX contexts, the MLflow sqlite
    schema, the audit log, release decisions). Released when the block ends or the process dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def dir_digest(path: Path) -> str:
    """sha256 over (relative name, sha256 of bytes) of every file: stable content identity of a model dir."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        fh = hashlib.sha256()
        with open(f, "rb") as fp:
            for chunk in iter(lambda: fp.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f"{f.relative_to(path).as_posix()}\0{fh.hexdigest()}\n".encode())
    return h.hexdigest()


def default_state_dir() -> Path:
    """The state dir when no run config names one: $LLMOPS_HOME, else `.llmops` (relative to the working directory).
    The one definition: PipelineConfig's default, the CLI and the serving home all ask here."""
    return Path(os.environ.get("LLMOPS_HOME", ".llmops"))
