"""Scheduled retraining: train only when the data changed since the production model; then open a promotion.

    deployment `llmops-retraining/nightly` (deployments/prefect.yaml, cron), or locally:
    python -c "from flows.retraining import retraining_flow; retraining_flow()"

Unchanged data (same fingerprint as the `production` version's lineage tag) → skip, nothing trained, no epsilon.
Changed → the training flow (privacy ledger enforced inside) → if the gate passed, a promotion is started as a
separate deployment run (it pauses for a release manager); without that deployment the run says how to start it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.steps import prepare_data_task
from flows.training import training_flow
from llmops.config import PipelineConfig
from llmops.services import connect_registry
from tasks.registry import production_version

PROMOTION_DEPLOYMENT = "llmops-promotion/promote"


def data_changed(current_fingerprint: str, production_tags: dict | None) -> bool:
    """Pure: retrain when there is no production model or its training data differs."""
    if production_tags is None:
        return True
    trained_on = production_tags.get("llmops.source_fingerprint") or production_tags.get("llmops.data_fingerprint")
    return trained_on != current_fingerprint


@flow(name="llmops-retraining", log_prints=True)
def retraining_flow(
    config: PipelineConfig = PipelineConfig(), requested_by: str = "scheduler", open_promotion: bool = True
) -> dict:
    logger = get_run_logger()
    data = prepare_data_task(config)  # the fingerprint of the raw data (validation runs inside training)
    prod = production_version(
        connect_registry(config.registry.tracking_uri, config.state_dir), config.registry.model_name
    )
    if not data_changed(data["fingerprint"], dict(prod.tags) if prod else None):
        logger.info(
            "data fingerprint %s unchanged since production v%s: nothing to do", data["fingerprint"][:12], prod.version
        )
        return {"status": "skipped", "fingerprint": data["fingerprint"], "production": str(prod.version)}
    logger.info("data changed (%s): retraining", data["fingerprint"][:12])
    result = training_flow(config=config)
    reg = result["registered"]
    if not reg["alias"]:
        logger.warning("gate failed (%s): no promotion opened", result["gate"]["summary"])
        return {"status": "trained-gate-failed", "registered": reg}
    if not open_promotion:
        return {"status": "trained", "registered": reg}
    return {
        "status": "promotion-opened",
        "registered": reg,
        "promotion": _open_promotion(config, reg["version"], requested_by),
    }


def _open_promotion(config: PipelineConfig, version: str, requested_by: str) -> dict:
    """Start the promotion deployment with a request signed by `requested_by`, a service identity whose private
    key this worker holds (governance `service_keys`); approvers are still people."""
    from prefect.deployments import run_deployment

    from llmops.errors import AccessDenied
    from llmops.governance.access import make_request
    from llmops.governance.keys import load_private_key
    from llmops.governance.policy import load_governance

    logger = get_run_logger()
    g = load_governance()
    try:
        if requested_by not in g.service_keys:
            raise AccessDenied(
                f"this worker holds no key for '{requested_by}'",
                f"{g.path}: service_keys",
                f"an admin enrols it (`llmops users add {requested_by} --role ml-engineer --key-out "
                f"F`) and lists F under service_keys",
            )
        key = load_private_key(g.resolve(g.service_keys[requested_by]))
        request = make_request(key, requested_by, "promote", config.registry.model_name, version)
    except AccessDenied as e:
        logger.warning("no promotion opened: %s", e)
        return {"started": False, "reason": str(e)}
    try:
        run = run_deployment(
            PROMOTION_DEPLOYMENT,
            timeout=0,
            parameters={"version": version, "request": request, "config": config.model_dump(mode="json")},
        )
    except Exception as e:  # noqa: BLE001 - no such deployment (local run) or API error
        logger.warning(
            "could not start deployment %s (%s); start the promotion yourself: llmops promote "
            "--config <cfg> --version %s --requested-by <you> --key-file <your key> --background",
            PROMOTION_DEPLOYMENT,
            str(e).splitlines()[0][:200],
            version,
        )
        return {"started": False}
    logger.info("promotion flow run %s started; it waits for a release manager's approval", run.id)
    return {"started": True, "flow_run_id": str(run.id)}
