"""MLflow 3 tracking and registry with full lineage.

One experiment per pipeline (`registry.experiment`), one MLflow run per training flow run (tagged with the
Prefect flow-run id and URL), the model logged as a self-contained pyfunc (tasks/mlflow_model.py + the HF dir),
registered as a new version with lineage tags, alias `candidate` set last — only when the gate passed.
A failure after the version exists deletes that version, so no half-registered version is ever left behind.

Default store: `sqlite:///<state_dir>/mlflow.db` with artifacts in `<state_dir>/mlartifacts`; once `llmops services
start` runs the MLflow server on that same store (UI included), clients of the state dir go through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TypedDict

from llmops.errors import LLMOpsError, RegistryError
from llmops.services import connect_registry

CANDIDATE, PRODUCTION, PREVIOUS = "candidate", "production", "previous"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def retry(fn, attempts: int = 4, base_delay: float = 0.5, what: str = "MLflow call"):
    """Retry transient tracking errors (connection resets, 5xx, SQLite busy) with exponential backoff."""
    from mlflow.exceptions import MlflowException

    for i in range(attempts):
        try:
            return fn()
        except (MlflowException, OSError) as e:
            transient = (
                isinstance(e, OSError)
                or getattr(e, "error_code", "")
                in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "REQUEST_LIMIT_EXCEEDED")
                or "database is locked" in str(e)
            )
            if not transient or i == attempts - 1:
                raise
            time.sleep(base_delay * 2**i)


def experiment_id(client, name: str, state_dir: str | Path, uri: str) -> str:
    exp = retry(lambda: client.get_experiment_by_name(name))
    if exp is not None:
        return exp.experiment_id
    # With a local sqlite store, keep artifacts in the state dir (not ./mlruns wherever the run started).
    location = (Path(state_dir).resolve() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
    return retry(lambda: client.create_experiment(name, artifact_location=location))


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent.parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(prefix: str, obj, out: dict | None = None) -> dict:
    """Nested config → flat MLflow params (`privacy.target_epsilon` ...), values as short strings."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


def production_version(uri: str, name: str):
    """The ModelVersion under alias `production`, or None."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        return retry(lambda: client.get_model_version_by_alias(name, PRODUCTION))
    except MlflowException as e:
        if getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        if getattr(e, "error_code", "") == "PERMISSION_DENIED" and not retry(  # basic auth (team mode) answers 403
            lambda: client.search_registered_models(filter_string=f"name='{name}'")
        ):  # for a model not there yet
            return None
        raise


def download_hf_model(uri: str, name: str, alias_or_version: str, dest: str | Path) -> Path:
    """Local HF dir of a registered version (`models:/name@alias` or a version number)."""
    import mlflow

    _client(uri)
    sep = "@" if not str(alias_or_version).isdigit() else "/"
    root = retry(
        lambda: mlflow.artifacts.download_artifacts(f"models:/{name}{sep}{alias_or_version}", dst_path=str(dest))
    )
    import yaml

    mlmodel = yaml.safe_load((Path(root) / "MLmodel").read_text()) if (Path(root) / "MLmodel").is_file() else {}
    rel = ((mlmodel.get("flavors", {}).get("python_function", {}).get("artifacts") or {}).get("hf_model") or {}).get(
        "path"
    )
    found = [Path(root) / rel] if rel and (Path(root) / rel / "config.json").is_file() else []
    if not found:
        raise RegistryError(
            "registered model has no hf_model artifact",
            f"models:/{name}{sep}{alias_or_version}",
            "register models with llmops (tasks/registry.py)",
        )
    return found[0]


class RegisteredVersion(TypedDict, total=False):
    """What `register_candidate` returns: the MLflow version a training run registered (or found registered)."""

    model_name: str
    version: str
    run_id: str
    experiment_id: str
    model_uri: str  # models:/NAME/VERSION
    alias: str | None  # "candidate" when the gate passed, else None
    reused: bool  # present and True when an identical registration existed: nothing was uploaded


def register_candidate(
    *,
    uri: str,
    state_dir: str,
    experiment: str,
    model_name: str,
    model_dir: str,
    params: dict,
    metrics: dict,
    step_metrics: list[dict],
    artifacts: dict[str, str],
    texts: dict[str, str],
    tags: dict[str, str],
    version_tags: dict[str, str],
    set_alias: bool,
) -> RegisteredVersion:
    """Log a run + model, register a version with lineage tags; set `candidate` last (if `set_alias`).

    Idempotent: a re-run whose registration would be identical (same fine-tuned model, evaluation, gate, reports,
    lineage; only the Prefect run differs) gets the version already registered instead of a copy of the weights."""
    import mlflow

    client = _client(uri)
    exp_id = experiment_id(client, experiment, state_dir, uri)
    key = registration_key(
        model_name=model_name,
        params=params,
        metrics=metrics,
        step_metrics=step_metrics,
        texts=texts,
        version_tags=version_tags,
        set_alias=set_alias,
    )
    if found := _registered_before(client, exp_id, model_name, key, version_tags):
        if set_alias:
            retry(lambda: client.set_registered_model_alias(model_name, CANDIDATE, found["version"]))
        return found | {"alias": CANDIDATE if set_alias else None}
    tags = tags | {REGISTRATION_KEY: key}
    run = retry(lambda: client.create_run(exp_id, tags=tags, run_name=tags.get("llmops.run_name")))
    run_id = run.info.run_id
    try:
        _log_run(client, run_id, params, metrics, step_metrics, artifacts, texts)
        with mlflow.start_run(run_id=run_id):
            info = retry(
                lambda: mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(MODEL_CODE),
                    artifacts={"hf_model": model_dir},
                    signature=_signature(),
                    pip_requirements=["torch", "transformers", "safetensors", "mlflow"],
                )
            )
        _ensure_model(client, model_name)
        version = retry(lambda: mlflow.register_model(info.model_uri, model_name, tags=version_tags))
        _wait_ready(client, model_name, version.version)
        if card := texts.get("model_card.md"):  # the version page in the MLflow UI shows it (and the plots)
            desc = version_description(card, uri, run_id, artifacts.get("plots"))
            retry(lambda: client.update_model_version(model_name, version.version, description=desc))
        if set_alias:
            retry(lambda: client.set_registered_model_alias(model_name, CANDIDATE, version.version))
        retry(lambda: client.set_terminated(run_id, "FINISHED"))
    except Exception as e:
        _delete_versions_of_run(client, model_name, run_id)  # never leave a half-registered version behind
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001
            pass
        if isinstance(e, LLMOpsError):
            raise
        raise RegistryError(
            f"registration failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            uri,
            "check the tracking server; the run was marked FAILED and no version was kept",
        ) from e
    return {
        "model_name": model_name,
        "version": str(version.version),
        "run_id": run_id,
        "experiment_id": exp_id,
        "model_uri": f"models:/{model_name}/{version.version}",
        "alias": CANDIDATE if set_alias else None,
    }


REGISTRATION_KEY = "llmops.registration_key"
# Which Prefect run asked, and the checkout it ran from: a re-run of unchanged steps from a newer commit registers
# the same model, evaluation and reports, so it gets the version (and lineage) of the run that produced them.
_RUN_SPECIFIC = ("prefect.flow_run_id", "prefect.flow_run_url", "llmops.git_commit")


def registration_key(
    *,
    model_name: str,
    params: dict,
    metrics: dict,
    step_metrics: list,
    texts: dict,
    version_tags: dict,
    set_alias: bool,
) -> str:
    """sha256 of everything a registration records except which Prefect run asked for it. The fine-tune is named by
    its lineage tags (attempt id, run id, fingerprints); of the per-step metrics only what is released (epsilon)
    enters, so nothing else computed from training records reaches the tag."""
    released = [{"step": m.get("step"), "epsilon": m.get("epsilon")} for m in step_metrics]
    body = {
        "model_name": model_name,
        "params": params,
        "metrics": metrics,
        "step_metrics": released,
        "texts": texts,
        "tags": {k: v for k, v in version_tags.items() if k not in _RUN_SPECIFIC},
        "set_alias": set_alias,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _registered_before(client, exp_id: str, model_name: str, key: str, version_tags: dict) -> dict | None:
    """The READY version a finished run with this registration key produced, if its lineage tags still match."""
    runs = retry(
        lambda: client.search_runs(
            [exp_id], f"tags.`{REGISTRATION_KEY}` = '{key}' and attributes.status = 'FINISHED'", max_results=5
        )
    )
    for run in runs:
        for mv in retry(lambda: client.search_model_versions(f"name='{model_name}' and run_id='{run.info.run_id}'")):
            same = all(mv.tags.get(k) == v for k, v in version_tags.items() if k not in _RUN_SPECIFIC)
            if mv.status == "READY" and same:
                return {
                    "model_name": model_name,
                    "version": str(mv.version),
                    "run_id": run.info.run_id,
                    "experiment_id": exp_id,
                    "model_uri": f"models:/{model_name}/{mv.version}",
                    "reused": True,
                }
    return None


def _delete_versions_of_run(client, model_name: str, run_id: str) -> None:
    try:
        for mv in client.search_model_versions(f"name='{model_name}'"):
            if mv.run_id == run_id:
                client.delete_model_version(model_name, mv.version)
    except Exception:  # noqa: BLE001 - best effort; the original error is what matters
        pass


def _ensure_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        retry(lambda: client.get_registered_model(name))
    except MlflowException:
        retry(lambda: client.create_registered_model(name, description="Fine-tuned with llmops (DP-SGD)"))


def _wait_ready(client, name: str, version: str, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while True:
        mv = retry(lambda: client.get_model_version(name, version))
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.time() > deadline:
            raise RegistryError(
                f"model version {version} is {mv.status}", f"models:/{name}/{version}", "check the artifact store"
            )
        time.sleep(1)


def _signature():
    from mlflow.models import infer_signature

    return infer_signature(model_input=["a prompt"], model_output=["a completion"], params={"max_new_tokens": 32})


RELEASED_STEP_METRICS = {"epsilon": "train.epsilon", "heldout_loss": "heldout.eval_loss"}


def version_description(card: str, uri: str, run_id: str, plots_dir: str | None) -> str:
    """The model card as the version's description, with the run's plots inline when MLflow serves them (a
    relative `get-artifact` URL: the UI loads it from the server it came from)."""
    pngs = sorted(p.name for p in Path(plots_dir).glob("*.png")) if plots_dir and Path(plots_dir).is_dir() else []
    tail = ""
    if pngs and uri.startswith(("http://", "https://")):
        imgs = "\n\n".join(f"![{n}](get-artifact?path=plots/{n}&run_uuid={run_id})" for n in pngs)
        tail = f"\n## Plots\n\n{imgs}\n"
    if len(card) + len(tail) > MAX_DESCRIPTION:  # keep the plots, cut the card's end (its full text is an artifact)
        note = "\n\n… (cut to fit the registry; the full card is the run's artifact reports/model_card.md)\n"
        card = card[: MAX_DESCRIPTION - len(tail) - len(note)] + note
    return card + tail


# MLflow's SQL stores keep a version's description in VARCHAR(5000): PostgreSQL refuses a longer one (SQLite does not)
MAX_DESCRIPTION = 5000


def _log_run(
    client, run_id: str, params: dict, metrics: dict, step_metrics: list[dict], artifacts: dict, texts: dict
) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    items = list(params.items())
    for i in range(0, len(items), 100):
        retry(lambda: client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]]))
    ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
    for m in step_metrics:
        # Only epsilon per step (and the held-out loss at the curve's few steps): the exact training loss, batch
        # size and throughput are computed from the sampled training records outside the mechanism (batch size
        # reveals the Poisson sample's size), so they stay local.
        for k, name in RELEASED_STEP_METRICS.items():
            if k in m and m[k] is not None and m[k] == m[k] and abs(float(m[k])) != float("inf"):
                ms.append(Metric(name, float(m[k]), now, int(m["step"])))
    for i in range(0, len(ms), 500):
        retry(lambda: client.log_batch(run_id, metrics=ms[i : i + 500]))
    for dest, path in artifacts.items():
        if path and Path(path).exists():
            p = Path(path)
            retry(
                lambda: (
                    client.log_artifacts(run_id, str(p), dest)
                    if p.is_dir()
                    else client.log_artifact(run_id, str(p), dest)
                )
            )
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in texts.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        if texts:
            retry(lambda: client.log_artifacts(run_id, tmp, "reports"))


def model_card(
    *,
    model_name: str,
    base_model: str,
    data: dict,
    privacy: dict,
    cumulative_epsilon: float | None,
    budget: float,
    evaluation: dict,
    decision: dict,
    validation: dict | None,
    config_yaml: str,
    public_eval: str | None = None,
    figures: list[str] | None = None,
) -> str:
    from llmops.governance.accounting import guarantee_problems
    from llmops.governance.policy import load_governance

    p = privacy
    problems = guarantee_problems(p)
    budget_delta_note = f"δ = {load_governance().privacy.budget_delta:.3g}"
    eps = f"{p['epsilon']:.3f}" if not problems else "∞ (not private)"
    rows = "\n".join(
        f"| {k} | {evaluation[k]:.4g} |"
        for k in ("eval_loss", "perplexity", "latency_ms_per_token_p50", "size_bytes", "params")
        if isinstance(evaluation.get(k), (int, float))
    )
    eval_label = (
        f"public data `{public_eval}`, none of it training data"
        if public_eval
        else "held-out private records: NOT covered by ε — these metrics are computed on records that were not "
        "trained on, outside the DP mechanism; set evaluation.public_eval_path to gate on public data"
    )
    gens = "\n".join(f"- *{g['prompt']}* → {g['completion'][:160]!r}" for g in evaluation.get("generations", []))
    val = (
        f"{'passed' if validation.get('passed') else 'FAILED'}; PII: "
        + ", ".join(f"{k}={v.get('count', 0)} ({v.get('policy')})" for k, v in validation.get("pii", {}).items())
        if validation
        else "not run"
    )
    not_private = (
        ""
        if not problems
        else "\n\n**NOT PRIVATE** — no differential-privacy guarantee holds for this "
        "model: " + "; ".join(problems) + ". It can never pass the gate or be promoted."
    )
    sampling_note = (
        "\n- Batches: Poisson sampling from the OS CSPRNG, one global sample per step shared by all "
        "ranks (training.seed does not determine them)."
        if p.get("sampling") == "poisson" and not p.get("reproducible_insecure")
        else ""
    )
    if p.get("reproducible_insecure"):
        sampling_note = (
            f"\n- reproducible_insecure: batches from training.seed and noise from noise_seed="
            f"{p.get('noise_seed')}; anyone who knows them knows every batch."
        )
    fp_note = (
        "\n- Noise (secure_mode): every tensor from Philox keyed with 128 fresh bits of os.urandom, 2n = 4 "
        "draws summed (Opacus' defence against floating-point attacks on Gaussian sampling)."
        if p.get("secure_mode")
        else "\n- Noise: a PyTorch generator of its own, seeded from os.urandom (never training.seed); secure_mode "
        "off, so floating-point attacks on the Gaussian sampler are not defended against."
    )
    return f"""# Model card: {model_name}

## Intended use
Text generation in the style of the fine-tuning data. Research/demo quality; not for decisions about people.

## Model
- Base: `{base_model}`; fine-tuning: {p.get("method", "?")} with DP-SGD through DeepSpeed
  ({p.get("world_size", 1)} rank(s)).

## Data
- Fingerprint `{data.get("fingerprint")}` ({data.get("n_records")} records: {data.get("n_train")} train /
  {data.get("n_eval")} held out by content hash), source `{data.get("source")}`; {data.get("n_duplicates_removed", 0)}
  near-duplicate records (variants, parts or concatenations of an earlier record: llmops/text/neardup.py) removed
  before the split, so one text is one record for training, the held-out split and the ledger.
- Validation: {val}.

## Privacy guarantee{not_private}
- (ε, δ) = ({eps}, {p.get("delta"):.3g}) for this run, record-level, {p.get("accountant", "?").upper()} accountant.
- Noise multiplier σ = {p.get("noise_multiplier", 0):.4f}, clipping bound C = {p.get("max_grad_norm")},
  sample rate q = {p.get("sample_rate", 0):.5f}, steps = {p.get("steps")}, expected batch {p.get("expected_batch_size")}.
- All runs so far that trained on this dataset's records (under any dataset name) compose, for its most-charged
  record, to ε = {cumulative_epsilon if cumulative_epsilon is not None else "?"} (budget {budget} per record).

### Limits of the guarantee
- It protects individual *records* of the training set; a person appearing in many records is protected less.
- It covers the training steps only; pruning/weight quantization are post-processing (free); anything else that read
  the private data afterwards would have to be charged to the same budget.{sampling_note}{fp_note}
- Exact per-step training loss and batch sizes are not released (they are computed outside the mechanism).
- Released exactly, outside the DP mechanism (not covered by ε): the record counts above, the validation report's
  counts (PII/PHI hits per kind, duplicates, Great Expectations observed values) and the dataset fingerprint. They
  describe the dataset, not a model trained on it; treat them as a disclosure of the dataset's size and PII
  prevalence, and keep the validation report internal when that matters.
- The budget is one (ε, δ) pair per record: every charge on a record is converted at the governance's
  privacy.budget_delta ({budget_delta_note}), whatever δ a run reports its own ε at.

## Evaluation ({eval_label})
| metric | value |
|---|---|
{rows}

Gate: **{decision.get("summary", "?")}**

Generations (greedy):
{gens}
{figures_note(figures)}
## Configuration
```yaml
{config_yaml}```
"""


def figures_note(figures: list[str] | None) -> str:
    if not figures:
        return ""
    items = "\n".join(f"- `plots/{n}`" for n in figures)
    return (
        f"\n## Figures (run artifacts)\n{items}\n- `plots/series.json`: every number plotted (held-out "
        "evaluation points and epsilon per step; no training loss)\n"
    )


def registration_inputs(
    cfg,
    *,
    data: dict,
    base_model: dict,
    tuned: dict,
    evaluation: dict,
    decision: dict,
    validation: dict | None,
    flow_run_id: str | None,
    flow_run_url: str | None,
    compression: dict | None = None,
    figures: dict[str, str] | None = None,
) -> dict:
    """Everything `register_candidate` needs, from the flow's step results (pure, no I/O)."""
    import yaml

    from llmops import __version__

    privacy = tuned["privacy"]
    cfg_json = json.loads(cfg.model_dump_json())
    config_yaml = yaml.safe_dump(cfg_json, sort_keys=False)
    params = flatten("", cfg_json)
    params.update(
        {
            f"dp.{k}": str(privacy.get(k))
            for k in (
                "noise_multiplier",
                "max_grad_norm",
                "sample_rate",
                "steps",
                "delta",
                "accountant",
                "sampling",
                "reproducible_insecure",
            )
        }
    )
    from llmops.governance.accounting import guarantee_problems

    private = not guarantee_problems(privacy)
    budget = tuned.get("budget", cfg.privacy.dataset_budget_epsilon)
    metrics = {f"eval.{k}": v for k, v in evaluation.items() if isinstance(v, (int, float)) and v is not None}
    if private:
        metrics["privacy.epsilon"] = privacy["epsilon"]
        metrics["privacy.epsilon_cumulative"] = tuned.get("cumulative_epsilon")
    for row in (compression or {}).get("variants", []):
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
                metrics[f"compression.{row['name']}.{k}"] = v
    lineage = {
        "llmops.data_fingerprint": data["fingerprint"],
        "llmops.source_fingerprint": data.get("source_fingerprint", data["fingerprint"]),
        "llmops.base_model_digest": base_model["digest"],
        "llmops.dp.private": str(private),
        "llmops.dp.epsilon": f"{privacy['epsilon']:.6g}" if private else "inf",
        "llmops.dp.delta": f"{privacy.get('delta'):.3g}",
        "llmops.dp.epsilon_cumulative": f"{tuned.get('cumulative_epsilon'):.6g}" if private else "inf",
        "llmops.dp.budget": str(budget),
        "llmops.dp.sampling": str(privacy.get("sampling")),
        "llmops.dp.reproducible_insecure": str(bool(privacy.get("reproducible_insecure"))),
        "llmops.dp.attempt_id": str(tuned.get("attempt_id", "")),
        "llmops.validation": ("passed" if validation.get("passed") else "failed") if validation else "not-run",
        "llmops.pii": json.dumps({k: v.get("count", 0) for k, v in (validation or {}).get("pii", {}).items()}),
        "llmops.gate": decision["summary"][:4000],
        "llmops.git_commit": git_commit(),
        "llmops.code_version": __version__,
        "llmops.finetune_run_id": tuned.get("run_id", ""),
        "prefect.flow_run_id": flow_run_id or "",
        "prefect.flow_run_url": flow_run_url or "",
    }
    card = model_card(
        model_name=cfg.registry.model_name,
        base_model=f"{cfg.model.source} {base_model['digest'][:12]}",
        data=data,
        privacy=privacy,
        cumulative_epsilon=tuned.get("cumulative_epsilon"),
        budget=budget,
        evaluation=evaluation,
        decision=decision,
        validation=validation,
        config_yaml=config_yaml,
        public_eval=str(cfg.evaluation.public_eval_path) if cfg.evaluation.public_eval_path else None,
        figures=sorted(figures or {}),
    )
    model_dir = tuned["model_path"]
    artifacts = {"privacy": str(Path(model_dir) / "privacy.json")}
    if validation:
        artifacts["validation/data_docs"] = (
            str(Path(validation["docs_path"]).parent) if validation.get("docs_path") else None
        )
    if compression and compression.get("edge"):
        artifacts["edge"] = compression["edge"]  # the edge target publishes this bundle
    if figures:
        artifacts["plots"] = str(Path(next(iter(figures.values()))).parent)  # PNGs + series.json
    texts = {
        "model_card.md": card,
        "evaluation.json": json.dumps(evaluation, indent=2),
        "gate.json": json.dumps(decision, indent=2),
        "config.yaml": config_yaml,
    }
    if validation:
        texts["validation_summary.md"] = validation.get("summary_md", "")
    if compression:
        texts["compression.md"] = compression.get("table_md", "")
    return dict(
        uri=connect_registry(cfg.registry.tracking_uri, cfg.state_dir),
        state_dir=str(cfg.state_dir),
        experiment=cfg.registry.experiment,
        model_name=cfg.registry.model_name,
        model_dir=model_dir,
        params=params,
        metrics=metrics,
        step_metrics=released_step_metrics(tuned),
        artifacts=artifacts,
        texts=texts,
        tags=lineage | {"llmops.run_name": f"{cfg.name}-{tuned.get('run_id', '')}"},
        version_tags=lineage,
        set_alias=bool(decision["passed"]),
    )


def released_step_metrics(tuned: dict) -> list[dict]:
    """Per-step series that may leave the machine: epsilon per step and the held-out curve points."""
    return [{"step": m["step"], "epsilon": m["epsilon"]} for m in tuned.get("metrics", [])] + [
        {"step": p["step"], "heldout_loss": p["eval_loss"]} for p in tuned.get("curve", [])
    ]
