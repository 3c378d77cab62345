"""The console is for people: help with examples and roles, third-party noise in the log file, one line per error,
a short summary at the end of `llmops train` (JSON only with --json)."""

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def _subparsers(p: argparse.ArgumentParser, path=("llmops",)):
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                yield (*path, name), sp
                yield from _subparsers(sp, (*path, name))


def test_every_command_help_has_an_example_and_the_top_level_lists_roles():
    from flows.cli import parser

    p = parser()
    top = p.format_help()
    for role in ("ml-engineer", "release-manager", "admin"):
        assert role in top, role
    commands = list(_subparsers(p))
    assert len(commands) >= 12
    missing = [" ".join(path) for path, sp in commands if "Example:\n  llmops " not in sp.format_help()]
    assert not missing, f"--help without an example: {missing}"


def test_what_reaches_the_terminal():
    from llmops.console import for_people

    def rec(name, level, msg, exc=False):
        r = logging.LogRecord(name, level, __file__, 1, msg, None, (ValueError, ValueError("x"), None) if exc else None)
        return for_people(r)

    assert rec("prefect.flow_runs", logging.INFO, "data d875: 300 records")
    assert not rec("prefect.flow_runs", logging.ERROR, "Encountered exception during execution", exc=True)
    assert not rec("prefect.flow_runs", logging.INFO, "Finished in state Failed('boom')")
    assert not rec("prefect.task_runs", logging.INFO, "Finished in state Completed()")
    assert rec("prefect.task_runs", logging.WARNING, "Task run failed with exception: X - Retry 1/2 will start 5s")
    assert rec("llmops.compression", logging.INFO, "built onnx")
    for noisy in ("torchao", "mlflow.pyfunc", "py.warnings", "DeepSpeed", "torch.utils._pytree", "prefect"):
        assert not rec(noisy, logging.WARNING, "noise"), noisy


NOISY = r"""
import logging, os, sys, warnings
from llmops import console
log = console.start(sys.argv[1])
print("the log is", log, file=console.terminal())
warnings.warn("a third-party FutureWarning", FutureWarning)
logging.getLogger("torchao").warning("Failed to load libfoo.so")
os.write(2, b"native library noise on fd 2\n")
print("a library print on stdout")
logging.getLogger("prefect.flow_runs").info("data 300 records")
logging.getLogger("prefect.task_runs").info("Finished in state Completed()")
try:
    raise RuntimeError("boom")
except RuntimeError:
    console.log_exception("run failed")
print('{"result": 1}', file=console.stdout())
"""


def test_third_party_noise_goes_to_the_log_file_and_people_see_their_lines(tmp_path):
    log = tmp_path / "logs" / "run.log"
    r = subprocess.run(
        [sys.executable, "-c", NOISY, str(log)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=dict(os.environ, PYTHONWARNINGS="default"),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"result": 1}  # stdout holds only what the CLI prints itself
    shown = r.stderr.splitlines()
    assert shown[0] == f"the log is {log}" and len(shown) == 2 and shown[1].endswith("  data 300 records"), shown
    text = log.read_text()
    for noise in (
        "FutureWarning",
        "Failed to load libfoo.so",
        "native library noise",
        "a library print",
        "Traceback (most recent call last)",
        "RuntimeError: boom",
    ):
        assert noise in text, noise


def test_train_summary_is_short_and_names_every_step():
    from llmops.console import train_summary

    result = {
        "data": {"n_records": 300, "n_train": 271, "n_eval": 29, "fingerprint": "d875a17f88f797f1"},
        "validation": {"passed": True, "cleaned": False},
        "finetune": {
            "privacy": {"private": True, "epsilon": 0.356, "delta": 3.7e-4, "steps": 3, "noise_multiplier": 1.0},
            "cumulative_epsilon": 0.712,
            "budget": 10.0,
        },
        "eval": {"eval_loss": 6.2463, "perplexity": 516.12},
        "production_eval": {"version": "1", "eval_loss": 6.3, "perplexity": 544.6},
        "gate": {"summary": "passed: held-out loss 6.2463 vs production 6.3000"},
        "compression": {
            "variants": [{"name": "onnx-int8", "size_ratio": 0.28, "speedup": 1.53}],
            "selected": "onnx-int8",
            "edge": "/s/compression/r/onnx-int8",
        },
        "registered": {
            "model_uri": "models:/llmops-demo/2",
            "alias": "candidate",
            "model_name": "llmops-demo",
            "version": "2",
        },
        "figures": {"training.png": "/s/figures/training.png"},
    }
    text = train_summary(
        result,
        83.2,
        "http://127.0.0.1:5000/#/models/llmops-demo/versions/2",
        "http://127.0.0.1:4200/runs/flow-run/abc",
        Path("/s/logs/train.log"),
    )
    lines = text.splitlines()
    assert len(lines) <= 14, text
    for needle in (
        "271 train",
        "ε = 0.356",
        "total ε = 0.712 of budget 10",
        "production v1",
        "passed: held-out",
        "selected onnx-int8",
        "edge bundle onnx-int8",
        "models:/llmops-demo/2 @candidate",
        "versions/2",
        "flow-run/abc",
        "/s/logs/train.log",
        "training.png",
    ):
        assert needle in text, needle


def test_services_stop_ends_the_state_dirs_background_runs(tmp_path):
    """A paused background promotion used to survive `llmops services stop` (its server gone under it)."""
    import subprocess
    import sys

    from flows.cli.common import _record_background, end_background_runs
    from llmops.files import pid_alive

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    _record_background(tmp_path, "promotion-x", proc.pid)
    assert end_background_runs(tmp_path, None, wait_s=0.5) == ["promotion-x"]
    proc.wait(timeout=10)
    assert not pid_alive(proc.pid) and not list((tmp_path / "background").glob("*.json"))


def test_a_phase_reports_at_least_every_interval_with_its_name(tmp_path):
    import io
    import time

    from llmops import console

    out = io.StringIO()
    with console.phase("compression (test)", every=0.2, out=out):
        time.sleep(0.75)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("compression (test) ...")
    assert sum("compression (test): running" in x for x in lines) >= 3
    stopped = io.StringIO()
    with console.phase("dp", every=0.2, out=stopped, quiet_when=lambda: True):  # the ranks report: no heartbeat
        time.sleep(0.5)
    assert stopped.getvalue().count("\n") == 1


def test_dp_step_lines_start_at_once_and_cover_long_steps():
    """The demo was silent between the rank's start and step 1, and during each 40 s step."""
    import io
    import time

    from tasks.finetune import _ProgressLines

    out = io.StringIO()
    bar = _ProgressLines(out, 0, 10, every=0.3)
    time.sleep(1.0)  # one long first step
    bar.update(1)
    bar.set_postfix(eps="0.50")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "10 step(s) to train" in lines[0]
    assert sum("step 1/10 running" in x for x in lines) >= 2 and "step 1/10, epsilon 0.50" in lines[-1]
    assert "ETA" in lines[-1]
