"""Figures of a training run, for the places people look: the MLflow run (PNG artifacts under `plots/`, referenced by
the model card) and the Prefect flow run (a markdown artifact with the MLflow link and the figure table).

    training.png     held-out loss at a few steps of the DP fine-tune + epsilon spent per step
    compression.png  size, speed-up and perplexity change of every compression variant vs the original

What a figure may show is what may leave the machine (see tasks/finetune.py and DESIGN.md's privacy model):
the held-out/public evaluation points of `curve.json` and epsilon per step (a function of the public sigma, q and
step count). Never the per-step training loss or batch size. `series.json` beside the PNGs holds exactly the numbers
plotted, so a test (and anyone) can check that.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from llmops.files import write_text_atomic

TRAINING, COMPRESSION, SERIES = "training.png", "compression.png", "series.json"


def training_series(curve: list[dict], step_metrics: list[dict]) -> dict:
    """The released series: eval points (step, held-out loss) and (step, epsilon). Pure; other keys are dropped."""
    heldout = [[int(p["step"]), float(p["eval_loss"])] for p in curve if math.isfinite(float(p["eval_loss"]))]
    eps = [
        [int(m["step"]), float(m["epsilon"])]
        for m in step_metrics
        if m.get("epsilon") is not None and math.isfinite(float(m["epsilon"]))
    ]
    return {"heldout_loss": heldout, "epsilon": eps}


def compression_series(compression: dict | None) -> list[dict]:
    """Per variant that was built and measured: size MB, speed-up, perplexity change (%), gate. Pure."""
    if not compression or not compression.get("baseline"):
        return []
    rows = []
    for v in [compression["baseline"], *compression.get("variants", [])]:
        if v.get("built", True) is False or v.get("speedup") is None:
            continue
        rows.append(
            {
                "name": v["name"],
                "size_mb": float(v["size_bytes"]) / 1e6 if v.get("size_bytes") else float(v["size_mb"]),
                "speedup": float(v["speedup"]),
                "ppl_delta_pct": 100 * float(v.get("ppl_delta") or 0.0),
                "passed": v["name"] == "original" or bool(v.get("passed")),
                "selected": v["name"] == compression.get("selected"),
            }
        )
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers
    import matplotlib.pyplot as plt

    return plt


def plot_training(series: dict, path: Path, budget: float | None = None) -> Path | None:
    if not series["heldout_loss"] and not series["epsilon"]:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax in (a, b):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    a.ticklabel_format(axis="y", useOffset=False)
    if series["heldout_loss"]:
        steps, loss = zip(*series["heldout_loss"])
        a.plot(steps, loss, marker="o", color="tab:blue")
    a.set(title="Held-out loss during DP fine-tuning", xlabel="step", ylabel="loss (nats/token)")
    a.grid(alpha=0.3)
    if series["epsilon"]:
        steps, eps = zip(*([[0, 0.0]] + series["epsilon"]))  # nothing is spent before the first step
        b.plot(steps, eps, color="tab:red", label="this run")
    if budget is not None and math.isfinite(budget) and series["epsilon"] and budget < 4 * max(eps):
        b.axhline(budget, color="grey", linestyle="--", label=f"budget {budget:g} per record")
    b.set(title="Privacy spent (ε)", xlabel="step", ylabel="ε")
    b.grid(alpha=0.3)
    if b.get_legend_handles_labels()[0]:
        b.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_compression(rows: list[dict], path: Path) -> Path | None:
    if len(rows) < 2:
        return None
    plt = _pyplot()
    names = [r["name"] + (" *" if r["selected"] else "") for r in rows]
    colors = ["tab:grey" if r["name"] == "original" else "tab:green" if r["passed"] else "tab:red" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.5 * len(rows) + 2.2), dpi=100, sharey=True)
    for ax, key, title in zip(
        axes, ("size_mb", "speedup", "ppl_delta_pct"), ("size (MB)", "speed-up (×, CPU)", "perplexity change (%)")
    ):
        ax.barh(names, [r[key] for r in rows], color=colors)
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()
    fig.suptitle("Compression variants vs original (green: passed the gate, red: failed, *: selected)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def render(
    out_dir: str | Path,
    curve: list[dict],
    step_metrics: list[dict],
    compression: dict | None,
    budget: float | None = None,
) -> dict[str, str]:
    """Write the PNGs and series.json into `out_dir`; returns {file name: path} of what was drawn."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = {"training": training_series(curve, step_metrics), "compression": compression_series(compression)}
    drawn = {
        TRAINING: plot_training(series["training"], out / TRAINING, budget),
        COMPRESSION: plot_compression(series["compression"], out / COMPRESSION),
    }
    write_text_atomic(out / SERIES, json.dumps(series, indent=2))
    return {name: str(p) for name, p in drawn.items() if p is not None}


def artifact_url(tracking_uri: str, run_id: str, name: str) -> str | None:
    """A URL a browser can load the logged PNG from (MLflow server only; a sqlite store has no URL)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/get-artifact?path=plots/{name}&run_uuid={run_id}"


def figures_markdown(figures: dict[str, str], registered: dict, tracking_uri: str, version_url: str | None) -> str:
    """The Prefect artifact: where the version is, and each figure (inline when MLflow serves it)."""
    where = (
        f"[{registered['model_uri']}]({version_url})"
        if version_url
        else f"`{registered['model_uri']}` (tracking URI `{tracking_uri}`)"
    )
    lines = [
        f"# {registered['model_name']} v{registered['version']}",
        "",
        f"Registered version: {where}; model card "
        "and plots are with the MLflow run (`reports/model_card.md`, `plots/`).",
        "",
        "| figure | where |",
        "|---|---|",
    ]
    images = []
    for name, path in figures.items():
        url = artifact_url(tracking_uri, registered["run_id"], name)
        lines.append(f"| {name} | {f'[plots/{name}]({url})' if url else f'`{path}`'} |")
        if url:
            images.append(f"![{name}]({url})")
    return "\n".join(lines + ([""] + images if images else [])) + "\n"
