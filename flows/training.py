"""The training flow: wiring only; every step's logic lives in `tasks/`.

    llmops train --config configs/demo.yaml
    # or as a deployment entrypoint: flows/training.py:training_flow

Steps that exist so far: prepare data (load, fingerprint, split) → resolve the base model →
held-out evaluation of the base model.
"""
from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task

from llmops.config import PipelineConfig
from tasks.data import prepare_data
from tasks.evaluation import evaluate_task
from tasks.model import resolve_model


@task(name="prepare-data", persist_result=False)
def prepare_data_task(cfg: PipelineConfig) -> dict:
    d = cfg.data
    return asdict(prepare_data(d.path, cfg.state_dir, d.eval_fraction, d.format, d.text_field, d.id_field,
                               d.max_records, d.max_line_bytes))


@task(name="resolve-model", persist_result=False)
def resolve_model_task(cfg: PipelineConfig) -> dict:
    m = cfg.model
    return asdict(resolve_model(m.source, cfg.state_dir, m.path, m.tokenizer_path, m.tiny.model_dump(), m.max_seq_len))


@flow(name="llmops-training", log_prints=True, validate_parameters=True)
def training_flow(config: PipelineConfig = PipelineConfig()) -> dict:
    logger = get_run_logger()
    data = prepare_data_task(config)
    logger.info("data %s: %d records (%d train / %d eval)", data["fingerprint"][:12], data["n_records"],
                data["n_train"], data["n_eval"])
    model = resolve_model_task(config)
    logger.info("base model %s (%s) at %s", model["digest"][:12], model["source"], model["path"])
    base_eval = evaluate_task(model["path"], data["eval_path"], config.evaluation.max_eval_records,
                              config.model.max_seq_len, config.model.dtype)
    logger.info("base model held-out loss %.4f (perplexity %.2f) on %d tokens", base_eval["eval_loss"],
                base_eval["perplexity"], base_eval["eval_tokens"])
    return {"data": data, "base_model": model, "base_eval": base_eval}
