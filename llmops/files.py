"""Small file helpers shared by the steps."""
from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | Path, text: str, mode: int | None = None) -> Path:
    """Write `text` to a hidden tmp file beside `path` (chmod `mode` first, if given), then rename it over `path`:
    readers see the old content or the new, never a half-written file or a secret file with loose permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        if mode is not None:
            os.chmod(tmp, mode)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
