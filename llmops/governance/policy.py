"""Governance: who may approve, how many approvals, which targets, privacy budgets, ledger, audit key.

    llmops governance init                        # admin, once per deployment (writes the file + audit key)
    llmops users add rm-bob --role release-manager  # admin: enrol a user (prints their private key once)
    llmops governance show                        # the policy in force and its digest

Property: a requester who controls a run's config (`--set`, the Prefect UI form, a deployment's parameters) must not
be able to choose the approvers, the number of approvals, the targets, the privacy budget, the ledger or the audit
key. So none of these are in `PipelineConfig`: they come from this admin-owned file, found through the environment
of the process that runs the flow (`LLMOPS_GOVERNANCE`, default `~/.config/llmops/governance.yaml`). In team mode
that process is the promotion worker, whose environment and file system the requester does not control.
A run config can only *tighten* what the file says (more approvals, fewer targets, a smaller budget).

Relative paths in the file resolve against the file's directory; everything governance keeps (ledger, audit log,
used codes) lives there by default, so it belongs to the deployment, not to a run's state dir.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmops.errors import ConfigError, LLMOpsError
from llmops.serving.settings import ServeSettings

GOVERNANCE_ENV = "LLMOPS_GOVERNANCE"
ACTIONS = ("trigger-training", "request-promotion", "approve-promotion", "request-rollback", "approve-rollback")
DEFAULT_ROLES = {
    "ml-engineer": ["trigger-training", "request-promotion"],
    "release-manager": ["approve-promotion", "request-rollback", "approve-rollback"],
    "admin": list(ACTIONS),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class User(_Strict):
    roles: list[str]
    public_key: str = Field(..., description="ed25519 public key, base64 (raw 32 bytes); only verification material")


class ApprovalPolicy(_Strict):
    required: int = Field(1, ge=1, description="Distinct approvals needed, for models not listed below")
    models: dict[str, int] = Field(default_factory=dict, description="Per registered model name: approvals needed")
    timeout_s: int = Field(86_400, ge=10, description="Longest a promotion may wait for approval")
    max_failures_per_approver: int = Field(
        5,
        ge=1,
        description="Invalid submissions one run takes without delay; "
        "after that each waits twice as long (per run: no approver is ever locked out)",
    )
    lockout_s: int = Field(900, ge=1, description="The longest wait between two submissions to one run")
    request_max_age_s: int = Field(900, ge=10, description="A signed promotion request older than this is refused")

    def required_for(self, model: str) -> int:
        return self.models.get(model, self.required)


class TargetSpec(_Strict):
    kind: str = Field(..., pattern="^(s3|onprem|edge|serve)$")
    uri: str = Field(..., description="Directory, s3://bucket/prefix, or for `serve` http://127.0.0.1:PORT")
    endpoint_url: str | None = None
    sse: str | None = Field(None, pattern="^(AES256|aws:kms)$")
    credentials_file: Path | None = Field(None, description="AWS shared-credentials INI read by the worker only")
    models: list[str] = Field(default_factory=lambda: ["*"], description="Registered models allowed here (* = all)")
    serve: ServeSettings | None = Field(
        None,
        description="kind serve: replicas, limits, cache, smoke test (llmops/serving/settings.py); None = defaults",
    )

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class PrivacyGovernance(_Strict):
    ledger: str = Field("privacy_ledger.sqlite", description="SQLite path (one machine) or postgresql:// URL (team)")
    dataset_budget_epsilon: float = Field(10.0, gt=0.0, description="Per-record epsilon cap across all runs")
    budget_delta: float = Field(
        1e-5,
        gt=0.0,
        lt=0.01,
        description=(
            "The delta of the budget: every charge on a record is converted at this delta, whatever delta a run "
            "reports its own epsilon at (the budget is one (epsilon, delta) pair per record); the default delta of a run"
        ),
    )


class AuditGovernance(_Strict):
    log: Path = Path("audit.log")
    signing_key: Path = Field(Path("audit-signing.key"), description="ed25519 private key (mode 600, worker only)")
    public_key: str = Field("", description="Its public key: anyone can verify the log, nobody else can write it")


class Governance(_Strict):
    version: int = 1
    roles: dict[str, list[str]] = Field(default_factory=lambda: {k: list(v) for k, v in DEFAULT_ROLES.items()})
    users: dict[str, User] = Field(default_factory=dict)
    approvals: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    targets: dict[str, TargetSpec] = Field(default_factory=dict)
    privacy: PrivacyGovernance = Field(default_factory=PrivacyGovernance)
    audit: AuditGovernance = Field(default_factory=AuditGovernance)
    state: Path = Field(Path("state"), description="Used codes, lockouts, promotion intents (SQLite)")
    registry_uri: str | None = Field(
        None,
        description="MLflow tracking URI that promotions read evidence from and move aliases in; a run config "
        "naming another one is refused. None = the run config's (single-user setups only)",
    )
    service_keys: dict[str, Path] = Field(
        default_factory=dict,
        description="Enrolled identities whose private key this worker holds, e.g. the nightly "
        "retraining's `scheduler` (it may request, never approve)",
    )

    # where it was loaded from (not part of the digest)
    _path: Path | None = None

    @field_validator("roles")
    @classmethod
    def _known_actions(cls, roles: dict[str, list[str]]) -> dict[str, list[str]]:
        for role, actions in roles.items():
            if bad := sorted(set(actions) - set(ACTIONS)):
                raise ValueError(f"role '{role}' names unknown actions {bad}; known: {list(ACTIONS)}")
        return roles

    # ------------------------------------------------------------------------------------------------ loading
    @property
    def path(self) -> Path:
        return self._path or governance_path()

    @property
    def home(self) -> Path:
        return self.path.parent

    def resolve(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else self.home / p

    @property
    def ledger(self) -> str:
        """SQLite file path (absolute) or a postgresql:// URL."""
        led = self.privacy.ledger
        return led if "://" in led else str(self.resolve(led))

    @property
    def audit_log(self) -> Path:
        return self.resolve(self.audit.log)

    @property
    def state_db(self) -> Path:
        return self.resolve(self.state) / "governance.sqlite"

    def digest(self) -> str:
        """sha256 of the canonical policy: shown on the approval form and in every audit entry."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def can(self, user: str, action: str) -> bool:
        u = self.users.get(user)
        return bool(u) and any(action in self.roles.get(r, []) for r in u.roles)

    def holders(self, action: str) -> list[str]:
        return sorted(u for u in self.users if self.can(u, action))

    def save(self) -> None:
        from llmops.files import write_text_atomic

        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        body = yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=False), sort_keys=False)
        write_text_atomic(self.path, HEADER + body, mode=0o600)


HEADER = """# llmops governance (admin-owned; read by the process that runs promotions: env LLMOPS_GOVERNANCE).
# Not a run parameter: a run config can only tighten it. Edit with `llmops users add`, or by hand, then
# `llmops governance show` prints the digest that approval forms and audit entries carry.
"""


def governance_path() -> Path:
    env = os.environ.get(GOVERNANCE_ENV)
    return Path(env).expanduser().resolve() if env else Path.home() / ".config" / "llmops" / "governance.yaml"


def load_governance(path: str | Path | None = None, required: bool = False) -> Governance:
    """The governance in force for this process. Without a file: defaults (no users, so no promotion can be
    approved) with the ledger and audit log in the default governance directory."""
    p = Path(path).expanduser().resolve() if path else governance_path()
    if not p.is_file():
        if required:
            raise ConfigError(
                "no governance file",
                str(p),
                f"an admin runs `llmops governance init` (or sets {GOVERNANCE_ENV} to the file)",
            )
        g = Governance()
        g._path = p
        return g
    if p.stat().st_mode & 0o022:
        raise ConfigError(
            "governance file is writable by others: anyone could change who approves",
            str(p),
            f"chmod 600 {p} (owned by the admin / promotion worker user)",
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        g = Governance.model_validate(data)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", str(p), "fix the governance file") from None
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{err['msg']}", f"{p}: {where}", "fix the governance file (an admin's job)") from None
    g._path = p
    return g


def require_user(g: Governance, user: str, action: str) -> None:
    """Raise unless `user` is enrolled and holds a role with `action` (identity is proven separately)."""
    if user not in g.users:
        raise LLMOpsError(f"unknown user '{user}'", str(g.path), "an admin enrols users with `llmops users add`")
    if not g.can(user, action):
        raise LLMOpsError(
            f"user '{user}' lacks permission '{action}'", str(g.path), "ask an admin to grant a role with that action"
        )


FROZEN_FIELDS = ("audit", "version")  # the audit key/log cannot be swapped by `set`: the log would not verify


def set_field(g: Governance, dotted: str, raw: str | None) -> tuple[object, object, Governance]:
    """(old value, new value, new governance) for `llmops governance set FIELD VALUE` (VALUE is YAML; None removes a
    key of a mapping such as `approvals.models.m`). Validated as a whole; `g` itself is not changed."""
    parts = [x for x in dotted.split(".") if x]
    if not parts or parts[0] in FROZEN_FIELDS or parts[0] not in Governance.model_fields:
        raise ConfigError(
            f"'{dotted}' is not a governance field that can be set",
            "llmops governance set",
            f"one of {sorted(set(Governance.model_fields) - set(FROZEN_FIELDS))} (dotted, e.g. "
            "approvals.required, approvals.models.m, privacy.dataset_budget_epsilon)",
        )
    data = g.model_dump(mode="json")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"'{dotted}': '{part}' is not a mapping", "llmops governance set", "check the field")
        node = node[part]
    old = node.get(parts[-1])
    try:
        new = yaml.safe_load(raw) if raw is not None else None
    except yaml.YAMLError as e:
        raise ConfigError(f"value is not YAML ({getattr(e, 'problem', e)})", dotted, "quote it") from None
    if new is None:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = new
    try:
        out = Governance.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(err["msg"], ".".join(str(x) for x in err["loc"]), "choose a valid value") from None
    out._path = g._path
    return old, new, out
