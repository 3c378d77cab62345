"""`llmops users`, `governance`, `ledger`, `audit` (admin): the policy outside any run config and its signed log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from flows.cli.common import _config_or_default, _move_ledger
from llmops.errors import LLMOpsError


def cmd_users(args) -> int:
    from llmops.governance.access import commit_governance, enrol_user, verified_governance
    from llmops.governance.policy import load_governance

    if args.op == "list":
        for name, u in sorted(load_governance(required=True).users.items()):
            print(f"{name:<20} {', '.join(u.roles)}")
        return 0
    g = verified_governance()  # an admin change starts from the audited governance, never from a hand edit
    if args.op == "remove":
        if args.name not in g.users:
            raise LLMOpsError(f"unknown user '{args.name}'", str(g.path), "see `llmops users list`")
        del g.users[args.name]
        commit_governance(g, "user-removed", user=args.name)
        print(f"{args.name} removed from {g.path} (audited)")
        return 0
    if not args.role:
        raise LLMOpsError("no role given", "--role", f"use one or more of {sorted(g.roles)}")
    if args.key_out and Path(args.key_out).exists():
        raise LLMOpsError("key file already exists", args.key_out, "choose another --key-out or move the old one away")
    pem = enrol_user(g, args.name, args.role)  # audited by enrol_user (commit_governance)
    if args.key_out:
        from llmops.files import write_text_atomic

        write_text_atomic(args.key_out, pem, mode=0o600)
        print(
            f"{args.name}: roles {sorted(set(args.role))} enrolled in {g.path}; private key written to "
            f"{args.key_out} (mode 600). Hand it to {args.name}; llmops keeps only the public key."
        )
    else:
        print(
            f"{args.name}: roles {sorted(set(args.role))} enrolled in {g.path}. Private key (shown once; "
            f"save it as a mode-600 file and pass it with --key-file; llmops keeps only the public key):",
            file=sys.stderr,
        )
        print(pem, end="")
    return 0


def cmd_governance(args) -> int:
    from llmops.governance.access import commit_governance, init_governance, verified_entries, verified_governance
    from llmops.governance.policy import TargetSpec, load_governance, set_field
    from llmops.governance.store import GovernanceStore

    if args.op == "init":
        g = init_governance()
        print(
            f"governance created: {g.path} (mode 600) with an audit signing key; next: `llmops users add`, "
            f"`llmops governance target`"
        )
        return 0
    if args.op == "show":
        g = load_governance(required=True)
        data = g.model_dump(mode="json")
        for u in data["users"].values():
            u["public_key"] = u["public_key"][:12] + "…"
        print(f"# {g.path}\n# digest {g.digest()}")
        print(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), end="")
        return 0
    if args.op == "adopt":  # sign the file as it is (after a hand edit an admin reviewed, or an old deployment)
        if not args.reason:
            raise LLMOpsError("no --reason given", "llmops governance adopt", "say why the file is signed as it is")
        g = load_governance(required=True)
        verified_entries(g)  # the log itself must be intact
        store = GovernanceStore(g.state_db)
        last = [e for e in _audit_entries(g) if e.get("action") == "governance"]
        changed = store.diff((last[-1].get("governance") or "") if last else "", g) if last else []
        commit_governance(g, "governance-adopted", reason=args.reason[:300], changed=changed[:50])
        print(f"governance {g.digest()[:16]} signed into the audit log (changed: {', '.join(changed) or 'unknown'})")
        return 0
    if args.op == "restore":  # back to the last audited governance (undo a hand edit)
        g = load_governance(required=True)
        entries = [e for e in _audit_entries(g) if e.get("action") == "governance"]
        body = GovernanceStore(g.state_db).snapshot_body(entries[-1].get("governance", "")) if entries else None
        if body is None:
            raise LLMOpsError(
                "no snapshot of the last audited governance",
                str(g.state_db),
                "restore the file from backup, or `llmops governance adopt --reason ...`",
            )
        from llmops.governance.policy import Governance

        restored = Governance.model_validate(body)
        restored._path = g.path
        restored.save()
        verified_governance()
        print(f"governance restored to the audited {restored.digest()[:16]} ({g.path})")
        return 0
    g = verified_governance()
    if args.op == "set":
        if not args.name:
            raise LLMOpsError(
                "no field given", "llmops governance set FIELD VALUE", "e.g. llmops governance set approvals.models.m 2"
            )
        old, new, g2 = set_field(g, args.name, args.value)
        commit_governance(g2, "governance-set", field=args.name, old=old, new=new)
        print(f"{args.name}: {old!r} -> {new!r} (audited; digest {g2.digest()[:16]})")
        return 0
    if args.op == "ledger":
        if not args.uri:
            raise LLMOpsError(
                "no --uri given",
                "llmops governance ledger",
                "e.g. --uri postgresql://ledger:PASSWORD@db.internal:5432/ledger or a SQLite path",
            )
        moved = _move_ledger(g, args.uri)
        print(f"privacy ledger now {args.uri.split('@')[-1]} ({moved} attempt(s) carried over with their charges)")
        return 0
    if args.op == "registry":
        if not args.uri:
            raise LLMOpsError(
                "no --uri given",
                "llmops governance registry",
                "e.g. --uri http://mlflow.internal:5000 or sqlite:////srv/llmops/mlflow.db",
            )
        if g.registry_uri == args.uri:
            print(f"registry unchanged ({args.uri})")
            return 0
        g.registry_uri = args.uri
        commit_governance(g, "registry-pinned", registry=args.uri)
        print(f"promotions now read evidence from and move aliases in {args.uri} only")
        return 0
    if args.op == "target":
        if not (args.name and args.kind and args.uri):
            raise LLMOpsError(
                "a target needs a name, --kind and --uri",
                "llmops governance target",
                "e.g. llmops governance target onprem --kind onprem --uri /srv/models",
            )
        spec = {
            "kind": args.kind,
            "uri": args.uri,
            "endpoint_url": args.endpoint_url,
            "credentials_file": args.credentials_file,
            "models": args.models or ["*"],
        }
        new = TargetSpec(**spec)
        if g.targets.get(args.name) == new:
            print(f"target '{args.name}' unchanged")
            return 0
        g.targets[args.name] = new
        commit_governance(g, "target-set", target=args.name, kind=args.kind, uri=args.uri, models=spec["models"])
        print(f"target '{args.name}' ({args.kind} {args.uri}) saved in {g.path}")
        return 0
    raise LLMOpsError(f"unknown governance operation {args.op!r}", "llmops governance", "see --help")


def _audit_entries(g) -> list[dict]:
    from llmops.governance.audit import AuditLog

    return AuditLog.for_governance(g).entries()


def audit_anchors(cfg) -> list[tuple[int, str, str]]:
    """(seq, line hash, where) of every decision anchored on MLflow model versions."""
    import mlflow

    from llmops.services import connect_registry

    uri = connect_registry(cfg.registry.tracking_uri, cfg.state_dir)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return []  # no registry yet, so nothing was ever anchored (and do not create one here)
    client = mlflow.MlflowClient(uri)
    anchors = []
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            for k, v in (mv.tags or {}).items():
                if k.startswith("llmops.decision."):
                    try:
                        seq, h = json.loads(v)["audit"].split(":")
                        anchors.append((int(seq), h, f"{rm.name} v{mv.version} {k}"))
                    except (ValueError, KeyError, TypeError):
                        anchors.append((-1, "", f"{rm.name} v{mv.version} {k} (malformed anchor)"))
    return anchors


def release_report(g, cfg) -> tuple[list[dict], list[str]]:
    """Per released model: what the signed log says vs MLflow's aliases and every governance target's pointer.
    Returns (rows, divergences)."""
    import mlflow

    from flows.promotion import alias_divergences, target_of
    from llmops.governance.access import verified_entries
    from llmops.governance.audit import release_divergences, release_state
    from llmops.services import connect_registry

    entries = verified_entries(g)
    logged = {e["model"] for e in entries if e.get("decision") in ("promoted", "rolled-back") and e.get("model")}
    uri = connect_registry(cfg.registry.tracking_uri, cfg.state_dir)
    no_registry = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file()
    client = mlflow.MlflowClient(uri) if logged or not no_registry else None  # never create a registry here
    aliased = set()
    if client is not None:
        try:  # a model the log never released must carry no release alias either (MLflow EDIT can set one)
            aliased = {
                rm.name
                for rm in client.search_registered_models()
                if {"production", "previous"} & set(getattr(rm, "aliases", None) or {})
            }
        except Exception:  # noqa: BLE001 - no registry reachable: the log's models are still checked below
            aliased = set()
    models = sorted(logged | aliased)
    rows, problems = [], []
    for m in models:
        st = release_state(entries, m)
        diverged = alias_divergences(client, st)
        pointers = {}
        for name, t in g.targets.items():  # every target that may hold the model, published to or not
            if t.allows(m):
                try:
                    pointers[name] = target_of(g, t).read_current(m)
                except Exception as e:  # noqa: BLE001 - a tampered or unreachable target is itself a finding
                    diverged.append(f"target '{name}': cannot read its pointer ({str(e)[:160]})")
        diverged += release_divergences(st, {}, pointers)
        rows.append(
            {
                "model": m,
                "production": st.production,
                "previous": st.previous,
                "history": st.stack,
                "targets": st.targets,
                "audit_seq": st.seq,
                "diverged": diverged,
            }
        )
        problems += diverged
    return rows, problems


def cmd_audit(args) -> int:
    """Signatures + chain of the governance audit log, its anchored head, every decision anchored in the registry,
    the governance file against the last signed admin entry, and every cache of the release state (MLflow aliases,
    target pointers) against the log. `reconcile` (admin) rewrites the MLflow aliases from the log, audited."""
    from llmops.errors import AuditTampered
    from llmops.governance.access import verified_governance
    from llmops.governance.audit import verify_audit_log
    from llmops.governance.decision import pinned_config
    from llmops.governance.policy import load_governance
    from llmops.governance.store import GovernanceStore

    g = load_governance(required=True)
    cfg = pinned_config(_config_or_default(args), g)
    anchors = audit_anchors(cfg)
    n = verify_audit_log(g.audit_log, g.audit.public_key, anchors, head=GovernanceStore(g.state_db).audit_head())
    g = verified_governance()
    rows, problems = release_report(g, cfg)
    if args.op == "reconcile":
        import mlflow

        from flows.promotion import set_release_aliases
        from llmops.governance.access import actor
        from llmops.governance.audit import AuditLog, release_state
        from llmops.services import connect_registry

        client = mlflow.MlflowClient(connect_registry(cfg.registry.tracking_uri, cfg.state_dir))
        entries = AuditLog.for_governance(g).entries()
        for r in rows:
            if any(d.startswith("MLflow") for d in r["diverged"]):
                set_release_aliases(client, release_state(entries, r["model"]))
                AuditLog.for_governance(g).append(
                    action="governance",
                    decision="aliases-reconciled",
                    model=r["model"],
                    governance=g.digest(),
                    policy=g.digest()[:16],
                    by=actor(),
                    reason="; ".join(r["diverged"])[:500],
                )
                print(
                    f"{r['model']}: MLflow aliases reset from the signed log (production "
                    f"{r['production']}, previous {r['previous']})"
                )
        rows, problems = release_report(g, cfg)
    if args.json:
        print(json.dumps({"entries": n, "anchors": len(anchors), "models": rows, "diverged": problems}, indent=2))
    else:
        print(
            f"{g.audit_log}: {n} entries, signatures, chain and anchored head intact; {len(anchors)} registry "
            f"anchor(s) match; governance {g.digest()[:16]} is the audited one"
        )
        for r in rows:
            print(
                f"  {r['model']}: production {r['production'] or '-'} (previous {r['previous'] or '-'}) per the "
                f"log, entry {r['audit_seq']}{'' if r['diverged'] else '; aliases and targets agree'}"
            )
    if problems:
        raise AuditTampered(
            "caches disagree with the signed audit log: " + "; ".join(problems),
            str(g.audit_log),
            "investigate who changed them; `llmops audit reconcile` resets MLflow aliases from the "
            "log; a target pointer is rewritten by the next approved promotion or rollback",
        )
    return 0


def cmd_ledger(args) -> int:
    """The deployment's ledger (governance file: privacy.ledger), whatever the run config or LLMOPS_HOME say."""
    from llmops.governance.ledger import open_ledger
    from llmops.governance.policy import load_governance

    g = load_governance()
    path = g.ledger
    if "://" not in path and not Path(path).is_file():
        print(f"{path}: no privacy ledger yet (no private training run has been planned)")
        return 0
    rows = open_ledger(path).summary(budget_delta=g.privacy.budget_delta)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{path}: {len(rows)} dataset(s); epsilon = the most-charged record's, composing every run that trained "
        "on it under any dataset name"
    )
    print(f"{'dataset':<18}{'runs':>5}{'records':>9}{'epsilon':>9}{'delta':>10}  accountant  last run")
    for r in rows:
        print(
            f"{r['fingerprint'][:16]:<18}{r['runs']:>5}{r['records']:>9}{r['epsilon']:>9.3f}{r['delta']:>10.2g}  "
            f"{r['accountant']:<10}  {r['last_run']}"
        )
    return 0


def add_parser(sub) -> None:
    us = sub.add_parser(
        "users",
        help="enrol users in governance (admin): roles ml-engineer, release-manager, admin",
        epilog="example: llmops users add rm-bob --role release-manager --key-out bob.key",
    )
    us.add_argument("op", choices=["add", "list", "remove"])
    us.add_argument("name", nargs="?")
    us.add_argument("--role", action="append")
    us.add_argument("--key-out", help="write the new private key here (mode 600) instead of printing it")
    us.set_defaults(func=cmd_users)
    gv = sub.add_parser(
        "governance",
        help="admin: create/show governance, add a promotion target, pin the registry, move the privacy ledger",
        epilog="example: llmops governance target onprem --kind onprem --uri /srv/models",
    )
    gv.add_argument("op", choices=["init", "show", "set", "target", "registry", "ledger", "adopt", "restore"])
    gv.add_argument("name", nargs="?", help="target name (for `target`); field (for `set`, e.g. approvals.required)")
    gv.add_argument("value", nargs="?", help="for `set`: the new value (YAML); omit to remove a mapping key")
    gv.add_argument("--reason", help="for `adopt`: why the file is signed as it is (audited)")
    gv.add_argument("--kind", choices=["onprem", "s3", "edge", "serve"])
    gv.add_argument("--uri")
    gv.add_argument("--endpoint-url")
    gv.add_argument("--credentials-file", help="AWS shared-credentials INI the promotion worker reads")
    gv.add_argument("--models", nargs="*", help="registered models allowed to go there (default: all)")
    gv.set_defaults(func=cmd_governance)
    lg = sub.add_parser("ledger", help="show the privacy ledger: epsilon spent per dataset (worst record)")
    lg.add_argument("--config", "-c")
    lg.add_argument("--json", action="store_true")
    lg.set_defaults(func=cmd_ledger, set=None)
    au = sub.add_parser("audit", help="verify the signed audit log (and its registry anchors with --config)")
    au.add_argument("op", choices=["verify", "reconcile"])
    au.add_argument("--config", "-c")
    au.add_argument("--json", action="store_true")
    au.set_defaults(func=cmd_audit, set=None)
