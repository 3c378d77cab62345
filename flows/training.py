"""The training flow: wiring only; every step's logic lives in `tasks/`.

    llmops train --config configs/demo.yaml
    # or as a deployment entrypoint: flows/training.py:training_flow

Steps that exist so far: prepare data (load, fingerprint, split) → resolve the base model →
held-out evaluation of the base model → DP fine-tuning through DeepSpeed (privacy ledger) → held-out
evaluation of the fine-tuned model.
"""
from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task

from llmops.config import PipelineConfig
from tasks.data import prepare_data
from tasks.evaluation import evaluate_task
from tasks.finetune import dp_finetune_task
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
    tuned = dp_finetune_task(config, data, model)
    privacy = tuned["privacy"]
    if privacy["private"]:
        logger.info("DP fine-tune done: epsilon=%.3f delta=%.2g sigma=%.3f C=%.2g q=%.4f steps=%d; dataset total "
                    "epsilon=%.3f of budget %.1f", privacy["epsilon"], privacy["delta"], privacy["noise_multiplier"],
                    privacy["max_grad_norm"], privacy["sample_rate"], privacy["steps"], tuned["cumulative_epsilon"],
                    config.privacy.dataset_budget_epsilon)
    else:
        logger.warning("NON-PRIVATE fine-tune (privacy.enabled=false): no privacy guarantee")
    tuned_eval = evaluate_task(tuned["model_path"], data["eval_path"], config.evaluation.max_eval_records,
                               config.model.max_seq_len, config.model.dtype)
    logger.info("fine-tuned held-out loss %.4f (base %.4f)", tuned_eval["eval_loss"], base_eval["eval_loss"])
    return {"data": data, "base_model": model, "base_eval": base_eval,
            "finetune": {k: v for k, v in tuned.items() if k != "metrics"}, "train_metrics": tuned["metrics"],
            "eval": tuned_eval}
