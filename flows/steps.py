"""The pipeline steps as Prefect tasks: every wrapper is declared here, one way, around a plain function of `tasks/`.

A step's logic lives in `tasks/<step>.py` as a plain function (callable and testable without Prefect); this module
adds what Prefect needs: a task name, the cache policy (`llmops.caching`: content of the inputs and of the files
they name, plus the task's source), retries, result persistence and the UI artifacts a step publishes. The flows in
`flows/` call only these wrappers.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact

from llmops.caching import CONTENT, files_key
from llmops.config import PipelineConfig
from llmops.services import model_version_url
from tasks.compression import CompressionResult, _compress_files, compress
from tasks.data import prepare_data
from tasks.evaluation import EvalResult, evaluate_model, public_eval_split
from tasks.finetune import FinetuneResult, bind_artifact, finetune
from tasks.model import _model_files, resolve_model
from tasks.plots import artifact_url, figures_markdown, render
from tasks.registry import RegisteredVersion, download_hf_model, register_candidate
from tasks.validation import failed_error, validate_data


@task(name="validate-data", persist_result=False)
def validate_task(data_cfg, val_cfg, out_dir: str, tokenizer_path: str | None, reuse: bool = True) -> dict:
    rep = validate_data(data_cfg, val_cfg, out_dir, tokenizer_path, workers=val_cfg.workers, reuse=reuse)
    create_markdown_artifact(rep.summary_md, key="data-validation", description="GX data validation")
    if not rep.passed:
        raise failed_error(rep, data_cfg.path)
    return asdict(rep)


@task(name="resolve-model", cache_policy=files_key(_model_files), persist_result=True)
def resolve_model_task(cfg) -> dict:
    m = cfg.model
    return asdict(resolve_model(m.source, cfg.state_dir, m.path, m.tokenizer_path, m.tiny.model_dump(), m.max_seq_len))


@task(name="prepare-data", cache_policy=files_key(lambda i: [i.get("path") or i["cfg"].data.path]), persist_result=True)
def prepare_data_task(cfg, path: str | None = None) -> dict:
    """Split `path` (the validated, possibly redacted data) or, without validation, `data.path`."""
    d = cfg.data
    if path and path != str(d.path):  # the redacted copy is JSONL with id/text, capped already
        return asdict(prepare_data(path, cfg.state_dir, d.eval_fraction, "jsonl", "text", "id", None, d.max_line_bytes))
    return asdict(
        prepare_data(
            d.path,
            cfg.state_dir,
            d.eval_fraction,
            d.format,
            d.text_field,
            d.id_field,
            d.max_records,
            d.max_line_bytes,
            d.encoding,
        )
    )


# Inputs are the config and the data/model dicts (content hashes), so an unchanged re-run reuses the result.
@task(name="dp-finetune", cache_policy=CONTENT, persist_result=True)
def dp_finetune_task(cfg, data: dict, model: dict) -> FinetuneResult:
    return finetune(cfg, data, model)


@task(name="bind-artifact", persist_result=False)
def bind_artifact_task(attempt_id: str, name: str, path: str) -> str:
    return bind_artifact(attempt_id, name, path)


@task(name="public-eval-data", persist_result=False)
def public_eval_task(path: str, out_dir: str, private_paths: list[str]) -> str:
    """Checked every run (no cache): the ledger grows between runs."""
    return public_eval_split(path, out_dir, private_paths)


@task(name="compress", cache_policy=files_key(_compress_files), persist_result=True)
def compress_task(
    model_path: str, out_dir: str, cfg, eval_path: str, max_len: int, private_paths: list[str] | None
) -> CompressionResult:
    result = compress(model_path, out_dir, cfg, eval_path, max_len, private_paths)
    if result["variants"]:
        create_table_artifact(
            table=result["rows"],
            key="compression",
            description=f"Compression variants vs original. Selected: "
            f"{result.get('selected_reason', result['selected'])}. Edge bundle: "
            f"{result.get('edge_reason', result['edge'])}",
        )
    return result


@task(name="evaluate-candidate", cache_policy=CONTENT, persist_result=True)
def evaluate_candidate_task(
    model_path: str, eval_path: str, prompts: list[str], max_records: int, max_len: int, max_new_tokens: int, dtype: str
) -> EvalResult:
    return evaluate_model(model_path, eval_path, prompts, max_records, max_len, max_new_tokens, dtype)


@task(
    name="evaluate-production",
    retries=2,
    retry_delay_seconds=5,
    persist_result=True,
    cache_policy=files_key(lambda i: [i["eval_path"]]),
)
def evaluate_production_task(cfg: PipelineConfig, eval_path: str, production: dict) -> EvalResult:
    """The model under alias `production`, scored on *this* run's held-out split (a fair comparison). Cached on the
    version's identity, the split's bytes and the settings: a re-run does not download and score it again."""
    prod = production
    with tempfile.TemporaryDirectory() as tmp:
        path = download_hf_model(prod["uri"], prod["name"], prod["version"], tmp)
        e = cfg.evaluation
        out = evaluate_model(
            str(path),
            eval_path,
            e.prompts,
            e.max_eval_records,
            cfg.model.max_seq_len,
            e.max_new_tokens,
            cfg.model.dtype,
        )
    return out | {"version": prod["version"]}


@task(name="register-model", retries=2, retry_delay_seconds=5, persist_result=False)
def register_task(**kwargs) -> RegisteredVersion:
    return register_candidate(**kwargs)


@task(name="figures", persist_result=False)
def figures_task(
    out_dir: str, curve: list[dict], step_metrics: list[dict], compression: dict | None, budget: float | None = None
) -> dict[str, str]:
    return render(out_dir, curve, step_metrics, compression, budget)


@task(name="publish-figures", persist_result=False)
def publish_figures_task(figures: dict[str, str], registered: dict, tracking_uri: str) -> None:
    url = model_version_url(tracking_uri, registered["model_name"], registered["version"])
    create_markdown_artifact(
        markdown=figures_markdown(figures, registered, tracking_uri, url),
        key="figures",
        description="Loss/epsilon curves and compression chart (MLflow)",
    )
    for name in figures:  # an image artifact needs a URL: only when an MLflow server serves the PNG
        if image := artifact_url(tracking_uri, registered["run_id"], name):
            create_image_artifact(
                image_url=image,
                key=f"figure-{Path(name).stem}",
                description=f"{registered['model_name']} v{registered['version']}: {name}",
            )
