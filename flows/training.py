"""The training flow: wiring only; every step's logic lives in `tasks/`.

    llmops train --config configs/demo.yaml
    # or as a deployment entrypoint: flows/training.py:training_flow

validate the data with Great Expectations (control characters, PII/PHI block or redact; bad data stops here,
before the model is resolved) → resolve the base model → prepare data (fingerprint, split) → DP fine-tune through DeepSpeed (privacy ledger) → evaluate the
candidate (+ the production model on the same split) → gate → register in MLflow (alias `candidate` only if the
gate passed).
With `compression.enabled`, gated compressed variants (and an ONNX edge bundle) are built from the DP model and
logged with the run.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.steps import (
    bind_artifact_task,
    compress_task,
    dp_finetune_task,
    evaluate_candidate_task,
    evaluate_production_task,
    figures_task,
    prepare_data_task,
    public_eval_task,
    publish_figures_task,
    register_task,
    resolve_model_task,
    validate_task,
)
from llmops import console
from llmops.config import PipelineConfig
from llmops.governance.accounting import guarantee_problems
from llmops.services import connect_registry
from tasks.evaluation import GatePolicy, decision_dict, should_promote
from tasks.model import validation_tokenizer
from tasks.registry import production_version, registration_inputs


def production_identity(cfg: PipelineConfig) -> dict | None:
    """Which registered version is `production` now (None if none): what its evaluation is cached on."""
    uri = connect_registry(cfg.registry.tracking_uri, cfg.state_dir)
    prod = production_version(uri, cfg.registry.model_name)
    if prod is None:
        return None
    return {
        "uri": uri,
        "name": cfg.registry.model_name,
        "version": str(prod.version),
        "run_id": prod.run_id or "",
        "source": prod.source or "",
    }


@flow(name="llmops-training", log_prints=True, validate_parameters=True)
def training_flow(config: PipelineConfig = PipelineConfig()) -> dict:
    logger = get_run_logger()
    refresh = {"refresh_cache": not config.use_cache}
    validation = None
    if config.validation.enabled:
        m = config.model
        # A report of identical inputs (bytes, settings, code) is reused: `llmops train` validated just before.
        validation = validate_task(
            config.data,
            config.validation,
            str(config.state_dir / "validation"),
            validation_tokenizer(m.source, config.state_dir, m.path, m.tokenizer_path),
        )
        logger.info(
            "data validation passed (%d records%s); Data Docs: %s",
            validation["n_records"],
            ", cleaned copy used" if validation["cleaned"] else "",
            validation["docs_path"],
        )
    with console.phase("base model (resolve / convert)"):
        model = resolve_model_task.with_options(**refresh)(config)
    logger.info("base model %s (%s) at %s", model["digest"][:12], model["source"], model["path"])
    with console.phase("data (near-duplicates, split)"):
        data = prepare_data_task.with_options(**refresh)(config, validation["data_path"] if validation else None)
    # The privacy ledger and lineage key on the data as delivered: a redacted copy is the same people's data.
    data = data | {
        "source_fingerprint": validation["source_fingerprint"] if validation else data["fingerprint"],
        "source_map": validation.get("source_map") if validation else None,
    }
    logger.info(
        "data %s: %d records (%d train / %d eval; %d duplicate train records removed)",
        data["fingerprint"][:12],
        data["n_records"],
        data["n_train"],
        data["n_eval"],
        data.get("n_duplicates_removed", 0),
    )

    tuned = dp_finetune_task.with_options(**refresh)(config, data, model)  # its own phase (tasks/finetune.py)
    p = tuned["privacy"]
    if p["private"]:
        logger.info(
            "DP fine-tune: epsilon=%.3f delta=%.2g sigma=%.3f C=%.2g q=%.4f steps=%d; dataset total "
            "epsilon=%.3f of budget %.1f",
            p["epsilon"],
            p["delta"],
            p["noise_multiplier"],
            p["max_grad_norm"],
            p["sample_rate"],
            p["steps"],
            tuned["cumulative_epsilon"],
            tuned["budget"],
        )
    else:
        logger.warning("NON-PRIVATE fine-tune: no privacy guarantee (%s)", "; ".join(guarantee_problems(p)))
    # Metrics that leave the machine are computed on public text when the team provides it; otherwise on the private
    # held-out split (not covered by epsilon, and the model card says so).
    e = config.evaluation
    eval_path = (
        public_eval_task(
            str(e.public_eval_path), str(config.state_dir / "public-eval"), [data["train_path"], data["eval_path"]]
        )
        if e.public_eval_path
        else data["eval_path"]
    )

    compression = None
    if config.compression.enabled:  # post-processing of the DP model (distillation only on public data)
        with console.phase("compression (build, ONNX export + checks, measure every variant)"):
            compression = compress_task.with_options(**refresh)(
                tuned["model_path"],
                str(config.state_dir / "compression" / tuned["run_id"]),
                config.compression,
                eval_path,
                config.model.max_seq_len,
                [data["train_path"], data["eval_path"]],
            )
        logger.info(
            "compression: selected %s; edge bundle %s",
            compression.get("selected_reason"),
            compression.get("edge_reason"),
        )
        if compression.get("edge") and p["private"]:  # the edge target and `serve --engine onnx` verify these bytes
            bind_artifact_task(tuned["attempt_id"], "edge", compression["edge"])

    with console.phase("evaluation (candidate, then production on the same split)"):
        candidate = evaluate_candidate_task.with_options(**refresh)(
            tuned["model_path"],
            eval_path,
            e.prompts,
            e.max_eval_records,
            config.model.max_seq_len,
            e.max_new_tokens,
            config.model.dtype,
        )
        production = production_identity(config)
        incumbent = (
            evaluate_production_task.with_options(**refresh)(config, eval_path, production) if production else None
        )
    policy = GatePolicy(e.max_loss_increase, e.max_latency_ratio, e.require_private)
    decision = decision_dict(
        should_promote(candidate, incumbent, policy, p, f"v{incumbent['version']}" if incumbent else None)
    )
    logger.info(
        "candidate held-out loss %.4f (perplexity %.2f); gate %s",
        candidate["eval_loss"],
        candidate["perplexity"],
        decision["summary"],
    )

    # Held-out loss + epsilon curves and the compression chart: PNGs for MLflow (model card) and Prefect.
    figures = figures_task(
        str(config.state_dir / "figures" / tuned["run_id"]),
        tuned.get("curve", []),
        tuned.get("metrics", []),
        compression,
        tuned.get("budget"),
    )
    with console.phase("registration (MLflow upload, lineage)"):
        registered = register_task(
            **registration_inputs(
                config,
                data=data,
                base_model=model,
                tuned=tuned,
                evaluation=candidate,
                decision=decision,
                validation=validation,
                compression=compression,
                figures=figures,
                flow_run_id=flow_run.id,
                flow_run_url=run_url(flow_run.id),
            )
        )
    logger.info(
        "registered %s version %s%s",
        registered["model_name"],
        registered["version"],
        " as @candidate" if registered["alias"] else " (gate failed: no alias)",
    )
    publish_figures_task(figures, registered, connect_registry(config.registry.tracking_uri, config.state_dir))
    return {
        "validation": validation,
        "compression": compression,
        "data": data,
        "base_model": model,
        "finetune": {k: v for k, v in tuned.items() if k != "metrics"},
        "figures": figures,
        "eval": candidate,
        "production_eval": incumbent,
        "gate": decision,
        "registered": registered,
        "prefect_run_url": run_url(flow_run.id),
    }


def run_url(flow_run_id: str | None) -> str | None:
    """The flow run's page in the Prefect UI (prefect.runtime's `ui_url` points at a Cloud-only route)."""
    from prefect.utilities.urls import url_for

    return url_for("flow-run", obj_id=flow_run_id) if flow_run_id else None
