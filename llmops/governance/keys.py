"""ed25519 keys and signatures, in one canonical text form.

Every person holds an ed25519 private key (printed once by `llmops users add`); governance stores only the public
key. Signatures and public keys are accepted only in their canonical base64url form (86 / 43 characters, re-encoded
and compared), so one signature has exactly one spelling: a re-encoded copy (`=` padding, `+/` for `-_`) is not
"new" to a consumed-once table.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from llmops.errors import AccessDenied

# ---------------------------------------------------------------------------------------------------- keys


def generate_keypair() -> tuple[str, str]:
    """(private key PEM, public key base64). The private half is shown once and never stored by llmops."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return pem, base64.b64encode(pub).decode()


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization

    p = Path(path).expanduser()
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except FileNotFoundError:
        raise AccessDenied("key file not found", str(p), "pass the key file `llmops users add` gave you") from None
    except (ValueError, TypeError):
        raise AccessDenied(
            "not an llmops private key (ed25519 PEM)", str(p), "pass the key file `llmops users add` gave you"
        ) from None
    if p.stat().st_mode & 0o077:
        raise AccessDenied("private key file is readable by others", str(p), f"chmod 600 {p}")
    return key


def _b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


_SIG_TEXT = re.compile(r"[A-Za-z0-9_-]{86}")


def decode_signature(text) -> bytes | None:
    """The 64 signature bytes of `text`, or None unless `text` is *the* canonical encoding of them: unpadded
    base64url, exactly 86 characters of the url-safe alphabet, zero trailing bits. So `sig+"="`, `+/` for `-_`,
    whitespace or a changed padding bit are not "another" code that verifies: there is one text per signature."""
    if not isinstance(text, str) or not _SIG_TEXT.fullmatch(text):
        return None
    raw = base64.urlsafe_b64decode(text + "==")
    return raw if len(raw) == 64 and _b64url(raw) == text else None


def decode_public_key(text) -> bytes | None:
    """The 32 raw bytes of an enrolled public key (standard base64, strict), or None."""
    try:
        raw = base64.b64decode(text or "", validate=True)
    except (ValueError, TypeError):
        return None
    return raw if len(raw) == 32 and base64.b64encode(raw).decode() == text else None


def sign(key, message: bytes) -> str:
    return _b64url(key.sign(message))


def verify_signature(public_key_b64: str | None, message: bytes, signature: str) -> bool:
    """Strict: a non-canonical encoding of a valid signature is refused (see `decode_signature`)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw_sig, raw_pub = decode_signature(signature), decode_public_key(public_key_b64)
    if raw_sig is None or raw_pub is None:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(raw_pub).verify(raw_sig, message)
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False
