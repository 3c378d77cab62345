"""A release manager approves a paused promotion in the real Prefect UI (headless Chromium via Playwright)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, _free_port, ledger_backed_tags

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
GOOD_TAGS = {
    "llmops.validation": "passed",
    "llmops.gate": "passed: no production model yet",
    "llmops.dp.private": "True",
    "llmops.dp.epsilon": "2.5",
    "llmops.dp.epsilon_cumulative": "2.5",
    "llmops.dp.budget": "10.0",
    "llmops.data_fingerprint": "ab" * 32,
    "llmops.dp.delta": "1e-05",
}


@pytest.fixture
def prefect_server(tmp_path):
    from llmops import services

    port = _free_port()
    url = services.start_prefect(tmp_path / "state", port)
    yield url, port
    services.stop_prefect(tmp_path / "state")


def test_release_manager_approves_in_prefect_ui(tmp_path, prefect_server):
    from playwright.sync_api import sync_playwright

    from llmops.files import write_text_atomic
    from llmops.governance.access import commit_governance, enrol_user, init_governance
    from llmops.governance.policy import TargetSpec, load_governance
    from llmops.services import connect_registry
    from tasks.model import resolve_model
    from tasks.registry import register_candidate

    api, port = prefect_server
    state = tmp_path / "state"
    g = init_governance()  # in this test's own LLMOPS_GOVERNANCE (conftest), inherited by the CLI subprocess
    keys = {
        n: write_text_atomic(tmp_path / f"{n}.key", enrol_user(g, n, [r]), mode=0o600)
        for n, r in (("rm-bob", "release-manager"), ("ml-alice", "ml-engineer"))
    }
    g.targets = {"onprem": TargetSpec(kind="onprem", uri=str(tmp_path / "onprem"))}
    commit_governance(g, "test-setup")
    model = resolve_model("tiny", state, tiny=dict(arch="llama", layers=1, hidden=32, heads=2, seed=0), max_len=32)
    register_candidate(
        uri=connect_registry(None, state),
        state_dir=str(state),
        experiment="e",
        model_name="m",
        model_dir=model.path,
        params={},
        metrics={"eval.eval_loss": 3.0},
        step_metrics=[],
        artifacts={},
        texts={},
        tags={},
        version_tags=(tags := ledger_backed_tags(GOOD_TAGS, ["r"], model_dir=model.path)),
        set_alias=True,
    )
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {"state_dir": str(state), "registry": {"model_name": "m"}, "promotion": {"approval_timeout_s": 300}}
        )
    )
    env = dict(os.environ, PREFECT_API_URL=api, LLMOPS_HOME=str(state), LLMOPS_PREFECT_PORT=str(port))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "promote",
            "--config",
            str(cfg),
            "--version",
            "1",
            "--requested-by",
            "ml-alice",
            "--key-file",
            str(keys["ml-alice"]),
            "--background",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ui_url = next(line.split(": ", 1)[1].strip() for line in r.stdout.splitlines() if "Prefect UI" in line)
    assert ui_url.startswith(f"http://127.0.0.1:{port}/runs/flow-run/")
    assert not (tmp_path / "onprem").exists()
    run_id = ui_url.rstrip("/").rsplit("/", 1)[1]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "approval-code",
            run_id,
            "--approver",
            "rm-bob",
            "--key-file",
            str(keys["rm-bob"]),
            "--expect",
            "1",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    code = r.stdout.splitlines()[0].strip()  # what the release manager pastes

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1400})
        page.route("**/*", lambda route: route.continue_() if "127.0.0.1" in route.request.url else route.abort())
        page.goto(ui_url)
        page.get_by_role("button", name="Resume").click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Promotion:").wait_for()
        shown = dialog.inner_text()  # the release manager sees the evidence and the policy in force
        assert f"ε = {tags['llmops.dp.epsilon']}" in shown and f"digest {g.digest()[:16]}" in shown
        dialog.get_by_role("switch").click()
        fields = dialog.locator("textarea, input[type=text], input[type=password]")
        fields.nth(0).fill("rm-bob")
        fields.nth(1).fill(code)
        fields.nth(2).fill("approved from the UI")
        dialog.get_by_role("button", name="Submit").click()
        submitted = time.time()
        page.screenshot(path=str(tmp_path / "after-submit.png"))
        browser.close()

    # Wait for the paused run to finish (not just for the manifest: the alias move and the "promoted" audit entry
    # come after it), then check every effect.
    import httpx

    deadline, run_state = time.time() + 180, None
    while time.time() < deadline:
        run_state = (httpx.get(f"{api}/flow_runs/{run_id}", timeout=10).json().get("state") or {}).get("type")
        if run_state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(0.5)
    assert run_state == "COMPLETED", f"promotion run ended as {run_state!r}"
    manifest = tmp_path / "onprem" / "m" / "1" / "manifest.json"
    assert manifest.exists(), "model did not land in the on-prem target"
    print(f"submit -> model in on-prem target: {manifest.stat().st_mtime - submitted:.1f} s")
    assert json.loads((tmp_path / "onprem" / "m" / "current.json").read_text())["version"] == "1"
    audit = [
        a
        for x in load_governance().audit_log.read_text().splitlines()
        if (a := json.loads(x)).get("action") != "governance"
    ]  # decisions, not the admin entries
    assert [a["decision"] for a in audit] == ["requested", "approved", "promoted"] and audit[1]["approver"] == "rm-bob"
    assert audit[0]["requested_by"] == "ml-alice"
