"""Figures (held-out loss + epsilon curves, compression chart): what they may show, and that they are drawn."""

import json

from tasks.finetune import curve_steps
from tasks.plots import compression_series, figures_markdown, render, training_series
from tasks.registry import released_step_metrics

PNG = b"\x89PNG\r\n\x1a\n"
# What a rank keeps per step locally (tasks/finetune.py _step_metrics): loss and batch must never leave the machine.
LOCAL_STEPS = [
    {"step": s, "loss": 6.0 - s / 10, "batch": 7 + s, "tokens": 300, "tokens_per_s": 900.0, "epsilon": 0.1 * s}
    for s in range(1, 11)
]
CURVE = [{"step": s, "eval_loss": 6.5 - s / 20} for s in sorted(curve_steps(10, 4))]


def test_curve_steps_start_at_zero_and_end_at_the_last_step():
    assert curve_steps(10, 4) == {0, 2, 5, 8, 10}  # round(2.5) == 2: banker's rounding, still evenly spread
    assert curve_steps(3, 5) == {0, 1, 2, 3}
    assert curve_steps(100, 0) == set() and curve_steps(0, 5) == set()
    assert max(curve_steps(7, 3)) == 7 and len(curve_steps(1000, 5)) == 6


def test_released_series_hold_only_eval_points_and_epsilon():
    series = training_series(CURVE, LOCAL_STEPS)
    assert set(series) == {"heldout_loss", "epsilon"}
    assert series["heldout_loss"] == [[p["step"], p["eval_loss"]] for p in CURVE]  # the eval points, not per step
    assert len(series["heldout_loss"]) == 5 < len(LOCAL_STEPS)
    assert series["epsilon"] == [[m["step"], m["epsilon"]] for m in LOCAL_STEPS]
    training_losses = {m["loss"] for m in LOCAL_STEPS} | {m["batch"] for m in LOCAL_STEPS}
    plotted = {v for pts in series.values() for _, v in pts}
    assert not plotted & training_losses
    # the same holds for what goes to MLflow as step metrics
    released = released_step_metrics(
        {"metrics": [{"step": m["step"], "epsilon": m["epsilon"]} for m in LOCAL_STEPS], "curve": CURVE}
    )
    assert {k for m in released for k in m} == {"step", "epsilon", "heldout_loss"}
    assert [m["heldout_loss"] for m in released if "heldout_loss" in m] == [p["eval_loss"] for p in CURVE]


def test_render_draws_pngs_and_writes_exactly_what_it_plotted(tmp_path):
    compression = {
        "baseline": {"name": "original", "size_bytes": 4e6, "size_mb": 4.0, "speedup": 1.0, "ppl_delta": 0},
        "variants": [
            {"name": "onnx", "size_mb": 4.1, "size_bytes": 4.1e6, "speedup": 1.27, "ppl_delta": 0.0, "passed": False},
            {
                "name": "onnx-int8",
                "size_mb": 1.2,
                "size_bytes": 1.2e6,
                "speedup": 1.53,
                "ppl_delta": 0.004,
                "passed": True,
            },
            {"name": "distilled", "built": False, "passed": False},
        ],
        "selected": "onnx-int8",
    }
    figs = render(tmp_path, CURVE, LOCAL_STEPS, compression, budget=10.0)
    assert set(figs) == {"training.png", "compression.png"}
    for path in figs.values():
        assert open(path, "rb").read(8) == PNG
    series = json.loads((tmp_path / "series.json").read_text())
    assert series["training"] == training_series(CURVE, LOCAL_STEPS)
    assert [r["name"] for r in series["compression"]] == ["original", "onnx", "onnx-int8"]  # unbuilt: not drawn
    assert series["compression"] == compression_series(compression)
    assert render(tmp_path / "none", [], [], None) == {}  # nothing to draw: no empty figure


def test_prefect_markdown_links_the_mlflow_version_and_inlines_plots_from_the_server():
    reg = {"model_name": "m", "version": "3", "run_id": "abc", "model_uri": "models:/m/3"}
    md = figures_markdown(
        {"training.png": "/s/training.png"}, reg, "http://127.0.0.1:5000", "http://127.0.0.1:5000/#/models/m/versions/3"
    )
    assert "[models:/m/3](http://127.0.0.1:5000/#/models/m/versions/3)" in md
    assert "![training.png](http://127.0.0.1:5000/get-artifact?path=plots/training.png&run_uuid=abc)" in md
    local = figures_markdown({"training.png": "/s/training.png"}, reg, "sqlite:////s/mlflow.db", None)
    assert "`/s/training.png`" in local and "![" not in local
