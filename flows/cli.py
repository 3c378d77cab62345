"""`llmops` command line: thin entry points over the flows.

    llmops train --config configs/demo.yaml [--set training.max_steps=5]
    llmops check-config configs/demo.yaml
    llmops prepare-model --config configs/demo.yaml

Errors a user can fix print one line (`error: <where>: <what> — <fix>`) and exit 2; no tracebacks.
Heavy libraries are imported inside commands so `llmops --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from llmops.errors import LLMOpsError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise LLMOpsError(f"override '{pair}' has no '='", "--set", "write --set section.field=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)  # so 3 -> int, true -> bool, [a, b] -> list
    return out


def _config(args):
    from llmops.config import load_config

    return load_config(args.config, _overrides(args.set))


class _NoTracebackForUserErrors(logging.Filter):
    """Prefect logs task failures with a traceback; for errors the user can fix the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], LLMOpsError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_errors() -> None:
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_NoTracebackForUserErrors())


def preflight(cfg) -> None:
    """Cheap checks before a flow starts, so common mistakes fail in one line without touching state."""
    if not Path(cfg.data.path).exists():
        raise LLMOpsError("data path does not exist", f"data.path={cfg.data.path}", "point it at a file or directory")
    if cfg.model.source == "local":
        from tasks.model import check_hf_dir

        check_hf_dir(Path(cfg.model.path))
    if not Path(cfg.training.deepspeed_config).is_file():
        raise LLMOpsError("DeepSpeed config not found", f"training.deepspeed_config={cfg.training.deepspeed_config}",
                          "use one of infra/deepspeed/*.json")


def cmd_train(args) -> int:
    cfg = _config(args)
    preflight(cfg)
    from prefect.logging.configuration import setup_logging

    from flows.training import training_flow

    setup_logging()
    _quiet_user_errors()
    result = training_flow(config=cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_check_config(args) -> int:
    from llmops.config import load_config

    cfg = load_config(args.file, _overrides(args.set))
    preflight(cfg)
    print(f"{args.file}: valid")
    if args.show:
        print(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    return 0


def cmd_prepare_model(args) -> int:
    from tasks.model import resolve_model

    cfg = _config(args)
    m = cfg.model
    ref = resolve_model(m.source, cfg.state_dir, m.path, m.tokenizer_path, m.tiny.model_dump(), m.max_seq_len)
    print(json.dumps(ref.__dict__, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmops", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("--config", "-c", required=required, help="PipelineConfig YAML (see configs/)")
        sp.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override, e.g. training.max_steps=5")
        return sp

    with_config(sub.add_parser("train", help="run the training flow")).set_defaults(func=cmd_train)
    c = sub.add_parser("check-config", help="validate a config file")
    c.add_argument("file")
    c.add_argument("--set", action="append", metavar="FIELD=VALUE")
    c.add_argument("--show", action="store_true", help="print the config with all defaults filled in")
    c.set_defaults(func=cmd_check_config)
    with_config(sub.add_parser("prepare-model", help="convert/cache the base model")).set_defaults(
        func=cmd_prepare_model)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMOpsError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
