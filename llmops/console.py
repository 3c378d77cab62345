"""The terminal is for people; everything else goes to the run's log file.

    log = console.start(state_dir / "logs" / "train-20261129-101500.log")   # once, before the flow runs

After `start`, file descriptors 1 and 2 point at the log file, so whatever a library writes (Python warnings,
torchao/triton/deepspeed/mlflow/transformers loggers, progress bars, C-level messages of native extensions, child
processes) lands there; `terminal()` and `stdout()` are the real terminal. On the terminal a person sees our flow's
own log lines (INFO and up, no tracebacks), Prefect's flow-run lines (start, UI link, end state), task retries,
and whatever the CLI prints itself (the summary, one line per error). The log file has everything, tracebacks
included, at WARNING and up for third-party loggers and INFO for ours and Prefect's.

A training rank (a child process) calls `child_start()`: its own noise goes to the same log (`LLMOPS_LOG_FILE`),
its progress bar to the terminal it was given as stderr.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TextIO

LOG_ENV = "LLMOPS_LOG_FILE"
OURS = ("llmops", "flows", "tasks")
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _State:
    log: Path | None = None
    terminal: TextIO | None = None
    stdout: TextIO | None = None


_state = _State()


def log_path() -> Path | None:
    return _state.log


def terminal() -> TextIO:
    """Where messages for people go (the real stderr), whether or not the console was started."""
    return _state.terminal or sys.stderr


def stdout() -> TextIO:
    """The real stdout (the summary, or JSON with --json)."""
    return _state.stdout or sys.stdout


def _redirect(log: Path) -> tuple[TextIO, TextIO]:
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    term = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ[LOG_ENV] = str(log)
    return term, out


def start(log: str | Path) -> Path:
    """Send third-party output to `log` and show people only what they need. Idempotent per process."""
    if _state.log is not None:
        return _state.log
    log = Path(log).resolve()
    _state.terminal, _state.stdout = _redirect(log)
    _state.log = log
    _configure_logging(log, _state.terminal)
    return log


def log_exception(message: str) -> None:
    """The current exception's traceback, into the log file only (the CLI prints one line itself)."""
    trace = logging.getLogger("llmops.traceback")
    if not trace.handlers:
        trace.propagate = False
        handler = logging.FileHandler(_state.log, encoding="utf-8") if _state.log else logging.NullHandler()
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        trace.addHandler(handler)
    trace.exception(message)


def child_start() -> TextIO | None:
    """In a child process started under `start`: our stderr (the parent's terminal) keeps the progress bar, the rest
    goes to the parent's log. Returns the terminal stream, or None when there is no log to go to."""
    log = os.environ.get(LOG_ENV)
    if not log or _state.log is not None:
        return _state.terminal
    sys.stderr.flush()
    _state.terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    _state.log = Path(log)
    logging.captureWarnings(True)
    return _state.terminal


def child_stderr() -> TextIO | None:
    """What to give a child process as stderr: the terminal when the console runs (None: inherit)."""
    return _state.terminal if _state.log is not None else None


def for_people(record: logging.LogRecord) -> bool:
    """Which log records reach the terminal."""
    name = record.name
    if name == "prefect.flow_runs":
        # the CLI prints a failure once itself; the traceback is in the log file
        return record.levelno < logging.ERROR and "Finished in state Failed" not in record.getMessage()
    if name == "prefect.task_runs":
        return record.levelno >= logging.WARNING and " - Retry " in record.getMessage()
    if name.split(".")[0] in OURS:
        return record.levelno >= logging.INFO
    return False


class _PeopleFormatter(logging.Formatter):
    """`10:15:02  message` (task lines name the task); never a traceback."""

    def __init__(self):
        super().__init__("%(asctime)s  %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if record.name == "prefect.task_runs" and getattr(record, "task_run_name", None):
            msg = f"[{record.task_run_name}] {msg}"
        if record.levelno >= logging.WARNING:
            msg = f"{record.levelname.lower()}: {msg}"
        return f"{self.formatTime(record, self.datefmt)}  {msg}"


def _configure_logging(log: Path, term: TextIO) -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:  # Prefect's console handlers (root, uvicorn, fastapi) would copy everything into the file
        for h in list(lg.handlers):  # (other libraries' stream handlers write to fd 2: the file, once)
            if isinstance(h, PrefectConsoleHandler):
                lg.removeHandler(h)
    root = logging.getLogger()
    to_file = logging.FileHandler(log, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(FILE_FORMAT))
    to_file.setLevel(logging.INFO)
    to_people = logging.StreamHandler(term)
    to_people.setFormatter(_PeopleFormatter())
    to_people.addFilter(for_people)
    root.addHandler(to_file)
    root.addHandler(to_people)
    root.setLevel(logging.WARNING)  # third-party INFO (httpx requests, ...) stays out even of the file
    for name in (*OURS, "prefect.flow_runs", "prefect.task_runs"):
        if logging.getLogger(name).getEffectiveLevel() > logging.INFO:
            logging.getLogger(name).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> logger py.warnings -> the file


def _fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, (int, float)) else str(x)


def train_summary(
    result: dict, seconds: float, mlflow_url: str | None, prefect_url: str | None, log: Path | None
) -> str:
    """The end of `llmops train` for a person: one line per step that matters, then where to look."""
    d, ft, ev, gate, reg = (result.get(k) or {} for k in ("data", "finetune", "eval", "gate", "registered"))
    p, prod, comp, val = (
        ft.get("privacy") or {},
        result.get("production_eval"),
        result.get("compression"),
        result.get("validation"),
    )
    rows = [
        (
            "data",
            f"{d.get('n_records')} records ({d.get('n_train')} train / {d.get('n_eval')} held out), "
            f"fingerprint {str(d.get('fingerprint', ''))[:12]}; validation "
            f"{'passed' if val and val.get('passed') else 'off' if not val else 'FAILED'}"
            + (" (cleaned copy)" if val and val.get("cleaned") else ""),
        )
    ]
    if p.get("private"):
        rows.append(
            (
                "privacy",
                f"ε = {_fmt(p.get('epsilon'), '.3f')}, δ = {_fmt(p.get('delta'), '.2g')} this run "
                f"({p.get('steps')} steps, σ = {_fmt(p.get('noise_multiplier'), '.3f')}); dataset "
                f"total ε = {_fmt(ft.get('cumulative_epsilon'), '.3f')} of budget "
                f"{_fmt(ft.get('budget'), 'g')} per record",
            )
        )
    else:
        rows.append(("privacy", "NOT PRIVATE: " + "; ".join(p.get("not_private_because") or ["DP off"])))
    vs = (
        f"; production v{prod.get('version')}: loss {_fmt(prod.get('eval_loss'))}, perplexity "
        f"{_fmt(prod.get('perplexity'), '.2f')}"
        if prod
        else "; no production model yet"
    )
    rows.append(
        ("evaluation", f"held-out loss {_fmt(ev.get('eval_loss'))}, perplexity {_fmt(ev.get('perplexity'), '.2f')}{vs}")
    )
    rows.append(("gate", gate.get("summary", "-")))
    if comp and comp.get("variants"):
        chosen = next((v for v in comp["variants"] if v["name"] == comp.get("selected")), None)
        what = (
            f"selected {chosen['name']} ({_fmt(chosen.get('size_ratio'), '.3g')}× size, "
            f"{_fmt(chosen.get('speedup'), '.3g')}× speed)"
            if chosen
            else "no variant passed its gate"
        )
        edge = comp.get("edge_name") or (Path(comp["edge"]).name if comp.get("edge") else None)
        rows.append(("compression", what + (f"; edge bundle {edge}" if edge else "; no edge bundle")))
    else:
        rows.append(("compression", "off"))
    rows.append(
        (
            "registered",
            f"{reg.get('model_uri', '-')}" + (f" @{reg['alias']}" if reg.get("alias") else " (gate failed: no alias)"),
        )
    )
    if result.get("figures"):
        rows.append(
            (
                "figures",
                ", ".join(sorted(result["figures"])) + " (MLflow run artifacts plots/, Prefect artifact 'figures')",
            )
        )
    links = [
        (
            "Prefect run",
            prefect_url
            or "temporary Prefect server (gone); `llmops services start` and export PREFECT_API_URL to keep runs",
        ),
        ("MLflow", mlflow_url or f"{reg.get('model_uri', '-')} (`mlflow ui` on the tracking URI shows it)"),
        ("log", str(log) if log else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"Training run finished in {seconds:.0f} s"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [
        f"  {'links':<{width}}  {k}: {v}" if i == 0 else f"  {'':<{width}}  {k}: {v}" for i, (k, v) in enumerate(links)
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- phases

HEARTBEAT_S = 30.0


def _phase_times_path() -> Path | None:
    return _state.log.parent / "phase-seconds.json" if _state.log else None


def _phase_estimate(name: str) -> float | None:
    import json

    p = _phase_times_path()
    try:
        return float(json.loads(p.read_text())[name]) if p else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _phase_record(name: str, seconds: float) -> None:
    import json

    p = _phase_times_path()
    if p is None:
        return
    try:
        data = json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[name] = round(seconds, 1)
    try:
        p.write_text(json.dumps(data, indent=1))
    except OSError:
        pass


def _human(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class phase:
    """A long step a person must be able to tell from a hang: a line when it starts, then on a terminal a bar of
    elapsed seconds against the last run's duration (the ETA), without one a line at least every `every` seconds
    with the phase name, elapsed time and ETA; the duration is remembered next to the logs for the next ETA.
    `quiet_when()` true = something else reports progress now (the DP ranks' step lines): stop the heartbeat.

        with console.phase("compression"):
            compress(...)
    """

    def __init__(self, name: str, every: float | None = None, quiet_when=None, out: TextIO | None = None):
        self.name, self.every, self.quiet_when = name, every or HEARTBEAT_S, quiet_when
        self.out = out
        self._stop = None

    def __enter__(self) -> phase:
        import threading
        import time

        self.out = self.out or terminal()
        self.t0 = time.time()
        self.eta = _phase_estimate(self.name)
        hint = f" (last run {_human(self.eta)})" if self.eta else ""
        print(f"{time.strftime('%H:%M:%S')}  {self.name} ...{hint}", file=self.out, flush=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"phase-{self.name}")
        self._thread.start()
        return self

    def _line(self) -> str:
        import time

        el = time.time() - self.t0
        eta = (
            f", ETA {_human(self.eta - el)}"
            if self.eta and self.eta > el
            else (", longer than last time" if self.eta else "")
        )
        return f"{time.strftime('%H:%M:%S')}  {self.name}: running {_human(el)}{eta}"

    def _beat(self) -> None:
        tty = getattr(self.out, "isatty", lambda: False)()
        step = 1.0 if tty else self.every
        last = 0.0
        import time

        while not self._stop.wait(step):
            if self.quiet_when is not None and self.quiet_when():
                continue
            if tty:
                print("\r" + self._line() + "   ", end="", file=self.out, flush=True)
                last = time.time()
            elif time.time() - max(last, self.t0) >= self.every - 0.01:
                print(self._line(), file=self.out, flush=True)
                last = time.time()
        if tty and last:
            print("", file=self.out, flush=True)

    def __exit__(self, exc_type, exc, tb) -> bool:
        import time

        self._stop.set()
        self._thread.join(timeout=5)
        seconds = time.time() - self.t0
        if exc_type is None:
            _phase_record(self.name, seconds)
            if seconds >= 5:
                print(f"{time.strftime('%H:%M:%S')}  {self.name}: done in {_human(seconds)}", file=self.out, flush=True)
        return False
