"""`llmops` command line: thin entry points over the flows.

    llmops train --config configs/demo.yaml [--set training.max_steps=5]
    llmops check-config configs/demo.yaml
    llmops prepare-model --config configs/demo.yaml
    llmops validate --config configs/demo.yaml                  # GX + PII/PHI report, no training
    llmops services start|stop [--team]                         # Prefect + MLflow (UIs) on 127.0.0.1
    llmops status [--json]                                      # services, pending approvals, production
    llmops governance init|show|target NAME --kind K --uri U    # admin: the policy outside any run config
    llmops users add NAME --role release-manager [--key-out F]  # admin: enrol; prints the private key once
    llmops promote --config configs/demo.yaml --requested-by ml-alice --key-file alice.key [--background]
    llmops approval-code RUN_ID --approver rm-bob --key-file bob.key [--reject]   # single-use, this run only
    llmops approve RUN_ID --approver rm-bob --key-file bob.key [--reject] [--comment TEXT]
    llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key [--background]
    llmops audit verify [--config F]

Errors a user can fix print one line (`error: <where>: <what> — <fix>`) and exit 2; no tracebacks.
Heavy libraries are imported inside commands so `llmops --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from flows.cli import admin, release, serve, services, train
from flows.cli.common import _state_dir
from llmops.errors import LLMOpsError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmops", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for group in (train, services, release, admin, serve):  # the order `llmops --help` lists the commands in
        group.add_parser(sub)
    _examples(p, sub)
    return p


ROLES = """Roles (governance file, enrolled by an admin with `llmops users add NAME --role ROLE`):
  ml-engineer      trigger training; request a promotion (llmops promote --requested-by YOU --key-file YOUR.key)
  release-manager  approve or reject a promotion (approval-code, approve); request and approve a rollback
  admin            governance init/show/target/registry, users add/list; every action above
Without a role: check-config, validate, prepare-model, train (local), status, ledger, audit verify, services.

Example:
  llmops services start && export PREFECT_API_URL=http://127.0.0.1:4200/api
  llmops train --config configs/tiny.yaml
  llmops <command> --help          # each command's options and an example"""

EXAMPLES = {
    "train": "llmops train --config configs/tiny.yaml\n"
    "llmops train --config configs/demo.yaml --set training.max_steps=5 --json > result.json",
    "check-config": "llmops check-config configs/demo.yaml --show --set privacy.target_epsilon=4",
    "validate": "llmops validate --config configs/demo.yaml --set data.path=my_data/",
    "prepare-model": "llmops prepare-model --config configs/demo.yaml   # converts SmolLM2 once into the state dir",
    "promote": "llmops promote --config configs/demo.yaml --version candidate --requested-by ml-alice \\\n"
    "    --key-file alice.key --background            # ml-engineer",
    "rollback": "llmops rollback --config configs/demo.yaml --requested-by rm-carol --key-file carol.key "
    "--background   # release-manager",
    "approval-code": "llmops approval-code 0b6c...e1 --approver rm-bob --key-file ~/bob.key --expect 3"
    "   # release-manager",
    "approve": "llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key            # release-manager\n"
    "llmops approve 0b6c...e1 --approver rm-bob --key-file ~/bob.key --reject --comment 'loss too high'",
    "users": "llmops users add rm-bob --role release-manager --key-out bob.key   # admin\nllmops users list",
    "governance": "llmops governance init                                              # admin, once\n"
    "llmops governance target onprem --kind onprem --uri /srv/models\n"
    "llmops governance set approvals.models.m 2      # every field; audited\n"
    "llmops governance show",
    "ledger": "llmops ledger --json",
    "audit": "llmops audit verify --config configs/demo.yaml\n"
    "llmops audit reconcile --config configs/demo.yaml   # admin: MLflow aliases back to the log",
}


def _examples(p: argparse.ArgumentParser, sub) -> None:
    """Every command's --help ends with an example (EXAMPLES, else the epilog it was built with); the top-level
    help lists the roles and who may run what."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = ROLES
    for name, sp in sub.choices.items():
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        text = EXAMPLES.get(name) or (sp.epilog or "").removeprefix("example: ")
        if text:
            sp.epilog = "Example:\n" + "\n".join(f"  {line}" for line in text.splitlines())


EPHEMERAL_STARTUP_S = 600


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Cached step results live beside the state they point at: deleting the state dir clears the cache too.
    home = _state_dir().resolve()
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(home / "prefect-results"))
    if not os.environ.get("PREFECT_API_URL"):
        # No server configured: Prefect starts a temporary one and gives it 20 s, which a 2-core machine under load
        # misses ("Timed out while attempting to connect to ephemeral Prefect API server"). A budget such a machine
        # meets; `llmops services start` keeps a server (and the runs' history) instead.
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_S))
    args = parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    from llmops import console

    try:
        return args.func(args)
    except LLMOpsError as e:  # printed once, on the terminal even when the console sends stderr to a log file
        print(f"error: {e}", file=console.terminal())
        if console.log_path():
            print(f"  (details: {console.log_path()})", file=console.terminal())
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=console.terminal())
        return 130
    except BrokenPipeError:  # `llmops users list | grep -q ...`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
