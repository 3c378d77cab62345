"""`llmops train`, `check-config`, `validate`, `prepare-model`: the training flow and the checks before it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

from flows.cli.common import _config, _overrides, with_config
from llmops.errors import LLMOpsError


def preflight_data(cfg) -> None:
    """What reading and validating the data needs (no training settings)."""
    if not Path(cfg.data.path).exists():
        raise LLMOpsError("data path does not exist", f"data.path={cfg.data.path}", "point it at a file or directory")
    if cfg.model.source == "local":
        from tasks.model import check_hf_dir

        check_hf_dir(Path(cfg.model.path))


def preflight(cfg) -> None:
    """Cheap checks before a flow starts, so common mistakes fail in one line without touching state."""
    preflight_data(cfg)
    if not Path(cfg.training.deepspeed_config).is_file():
        raise LLMOpsError(
            "DeepSpeed config not found",
            f"training.deepspeed_config={cfg.training.deepspeed_config}",
            "use one of infra/deepspeed/*.json",
        )


def validate(cfg, reuse: bool = True):
    """The data validation `validate` and `train` run before anything else; raises one DataValidationError line."""
    from tasks.model import validation_tokenizer
    from tasks.validation import failed_error, validate_data

    m = cfg.model
    tok = validation_tokenizer(m.source, cfg.state_dir, m.path, m.tokenizer_path)
    rep = validate_data(
        cfg.data,
        cfg.validation,
        Path(cfg.state_dir) / "validation",
        tok,
        workers=cfg.validation.workers,
        progress=sys.stderr.isatty(),
        reuse=reuse,
    )
    return rep, (failed_error(rep, cfg.data.path) if not rep.passed else None)


def cmd_train(args) -> int:
    cfg = _config(args)
    preflight(cfg)
    if cfg.validation.enabled:  # fail fast: bad data stops here, before Prefect starts or the model is resolved
        _, error = validate(cfg, reuse=cfg.use_cache)
        if error:
            raise error
    import time

    from llmops import console

    started = time.time()
    import secrets

    # unique per run: two runs started in the same second (a schedule and a person) must not share a log
    log = console.start(
        Path(cfg.state_dir) / "logs" / f"train-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"
    )
    print(f"log: {log} (third-party warnings and tracebacks go there)", file=console.terminal())
    from flows.training import training_flow

    try:
        result = training_flow(config=cfg)
    except Exception as e:
        console.log_exception("training run failed")  # the traceback, in the log file only
        if isinstance(e, LLMOpsError):
            raise
        raise LLMOpsError(
            f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            str(log),
            "the traceback is in that log file; re-running resumes from cached steps",
        ) from None
    if args.json:
        print(json.dumps(result, indent=2, default=str), file=console.stdout())
        return 0
    from llmops.services import connect_registry, model_version_url

    reg = result["registered"]
    mlflow_url = model_version_url(
        connect_registry(cfg.registry.tracking_uri, cfg.state_dir), reg["model_name"], reg["version"]
    )
    prefect_url = result.get("prefect_run_url") if os.environ.get("PREFECT_API_URL") else None
    print(console.train_summary(result, time.time() - started, mlflow_url, prefect_url, log), file=console.stdout())
    return 0


def cmd_validate(args) -> int:
    """Validate the data (GX + PII) without training; exit 2 if it fails. Needs no training settings."""
    cfg = _config(args)
    preflight_data(cfg)
    rep, error = validate(cfg, reuse=False)
    print(rep.summary_md)
    if error:
        raise error
    return 0


def cmd_check_config(args) -> int:
    from llmops.config import load_config

    cfg = load_config(args.file, _overrides(args.set))
    preflight(cfg)
    print(f"{args.file}: valid")
    if args.show:
        from llmops.config import pii_defaults

        print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
        print("# effective PII/PHI policy (validation.pii, merged over the defaults)")
        defaults = pii_defaults()
        for cat, policy in cfg.validation.pii.items():
            print(f"#   {cat:<12} {policy:<7} {'(default)' if defaults.get(cat) == policy else '(set)'}")
    return 0


def cmd_prepare_model(args) -> int:
    from tasks.model import resolve_model

    cfg = _config(args)
    m = cfg.model
    ref = resolve_model(m.source, cfg.state_dir, m.path, m.tokenizer_path, m.tiny.model_dump(), m.max_seq_len)
    print(json.dumps(ref.__dict__, indent=2))
    return 0


def add_parser(sub) -> None:
    tr = with_config(sub.add_parser("train", help="run the training flow"))
    tr.add_argument("--json", action="store_true", help="print the full result as JSON on stdout (nothing else)")
    tr.set_defaults(func=cmd_train)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE")
    c.add_argument("--show", action="store_true", help="print the config with all defaults filled in")
    c.set_defaults(func=cmd_check_config)
    with_config(sub.add_parser("validate", help="validate the data (GX + PII/PHI) without training")).set_defaults(
        func=cmd_validate
    )
    with_config(sub.add_parser("prepare-model", help="convert/cache the base model")).set_defaults(
        func=cmd_prepare_model
    )
