"""An ML engineer / release manager opens the registered version in the real MLflow UI (headless Chromium via
Playwright): the model card is the version's description and the training plot is rendered from the run's artifacts.

Screenshots are kept as test artifacts: test-artifacts/mlflow-model-card.png (top of the version page) and
test-artifacts/mlflow-model-version.png (scrolled to the plot), both gitignored.
"""

from pathlib import Path

import pytest

from tests.conftest import ROOT

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "test-artifacts" / "mlflow-model-version.png"


def test_mlflow_ui_shows_the_model_card_and_plots(mlflow_server, prefect_harness, tiny_config):
    from playwright.sync_api import sync_playwright

    from flows.training import training_flow

    cfg = tiny_config
    cfg.registry.tracking_uri = mlflow_server
    cfg.evaluation.curve_points = 3
    out = training_flow(config=cfg)
    reg = out["registered"]
    assert "training.png" in out["figures"]
    # The Prefect run shows the same: a markdown artifact linking the MLflow version, the plot inline
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["figures"])))
    md = max(arts, key=lambda a: a.created).data
    assert f"{mlflow_server}/#/models/{reg['model_name']}/versions/{reg['version']}" in md
    assert f"get-artifact?path=plots/training.png&run_uuid={reg['run_id']}" in md
    with get_client(sync_client=True) as client:
        images = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["figure-training"])))
    assert max(images, key=lambda a: a.created).data.endswith(f"path=plots/training.png&run_uuid={reg['run_id']}")

    SCREENSHOT.parent.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.route("**/*", lambda route: route.continue_() if "127.0.0.1" in route.request.url else route.abort())
        page.goto(f"{mlflow_server}/#/models/{reg['model_name']}/versions/{reg['version']}")
        page.get_by_text(f"Model card: {reg['model_name']}").first.wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOT.with_name("mlflow-model-card.png")))
        body = page.inner_text("body")
        for needle in (
            "Privacy guarantee",
            f"(ε, δ) = ({out['finetune']['privacy']['epsilon']:.3f}",
            "Limits of the guarantee",
            "plots/training.png",
            "candidate",
        ):
            assert needle in body, needle
        plot = page.locator(f"img[src*='path=plots/training.png'][src*='run_uuid={reg['run_id']}']").first
        plot.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle(), timeout=15_000)
        assert plot.evaluate("img => img.naturalWidth") >= 800  # the 1000 px wide PNG, not a broken-image icon
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
