"""User-facing errors: what was wrong, where, and what to do.

The CLI prints `str(err)` as one line and exits non-zero; nothing else reaches the user.
"""

from __future__ import annotations


class LLMOpsError(Exception):
    """An error a user can fix. `where` is a path, `file:line` or a config field."""

    exit_code = 2

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.format())

    def format(self) -> str:
        head = f"{self.where}: {self.what}" if self.where else self.what
        return f"{head} — {self.fix}" if self.fix else head


class ConfigError(LLMOpsError):
    """The pipeline configuration is invalid."""


class DataError(LLMOpsError):
    """The training data cannot be read or does not meet the rules."""


class ModelError(LLMOpsError):
    """The model cannot be found, converted or loaded."""


class AccessDenied(LLMOpsError):
    """Authentication or authorisation failed."""


class AuditTampered(LLMOpsError):
    """The audit trail does not verify."""


class GovernanceTampered(LLMOpsError):
    """The governance file is not the one the signed audit log last recorded, or others can read/write it."""


class PrivacyError(LLMOpsError):
    """A run would break the privacy guarantee or budget."""


class PromotionError(LLMOpsError):
    """A promotion cannot proceed."""


class RegistryError(LLMOpsError):
    """Tracking server/registry failure."""
