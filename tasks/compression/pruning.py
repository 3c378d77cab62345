"""Pruning by weight magnitude: post-processing of the DP model, no data read (no epsilon).

magnitude_global / magnitude_layer: unstructured L1, made permanent (zeros stay dense, so no speed-up without a
sparse kernel). mlp_channels: structured, drops whole MLP channels so the matmuls shrink.
"""

from __future__ import annotations

from pathlib import Path

from tasks.compression.common import (
    CompressionError,
    compressible_linears,
    decoder_layers,
    linear_sparsity,
    rebuild,
    save_hf,
)


def prune_magnitude(model, sparsity: float, scope: str = "global") -> float:
    """Zero the smallest-|w| fraction of the block Linear weights (one global threshold, or per layer); permanent."""
    import torch
    from torch.nn.utils import prune

    mods = list(compressible_linears(model).values())
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured, amount=sparsity)
    else:
        for m in mods:
            prune.l1_unstructured(m, "weight", amount=sparsity)
    for m in mods:
        prune.remove(m, "weight")  # fold the mask into the weight: no weight_orig/mask left behind
    with torch.no_grad():
        return linear_sparsity(model)


def _mlp_kind(layer) -> str:
    mlp = getattr(layer, "mlp", None)
    if mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "gated"
    if mlp is not None and hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        return "gpt2"
    raise CompressionError(
        f"MLP of {type(layer).__name__} is neither Llama-style nor GPT-2-style",
        "compression.prune_method",
        "use magnitude_global or magnitude_layer for this model",
    )


def prune_mlp_channels(model, sparsity: float):
    """Structured: keep the top (1-sparsity) MLP channels per block by weight norm; returns a *smaller* model.

    Channel j's importance = |w_in_j| * |w_out_j| (gate*up*down norms for gated MLPs). Every block keeps the same
    count (HF configs hold one intermediate size), rounded down to a multiple of 8 for the matmul kernels.
    """
    import copy

    import torch

    prefix, layers = decoder_layers(model)
    kind = _mlp_kind(layers[0])
    cfg = copy.deepcopy(model.config)
    inter = layers[0].mlp.up_proj.out_features if kind == "gated" else layers[0].mlp.c_fc.weight.shape[1]
    keep = max(1, round(inter * (1 - sparsity)))
    keep = keep - keep % 8 if keep >= 8 else keep
    sd = model.state_dict()
    with torch.no_grad():
        for i, layer in enumerate(layers):
            p = f"{prefix}.{i}.mlp."
            mlp = layer.mlp
            if kind == "gated":
                score = (
                    mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * mlp.down_proj.weight.norm(dim=0)
                )
                idx = score.topk(keep).indices.sort().values
                for n in ("gate_proj", "up_proj"):
                    sd[p + n + ".weight"] = sd[p + n + ".weight"][idx].clone()
                    if p + n + ".bias" in sd:
                        sd[p + n + ".bias"] = sd[p + n + ".bias"][idx].clone()
                sd[p + "down_proj.weight"] = sd[p + "down_proj.weight"][:, idx].clone()
            else:  # GPT-2 Conv1D stores weights as (in, out)
                score = mlp.c_fc.weight.norm(dim=0) * mlp.c_proj.weight.norm(dim=1)
                idx = score.topk(keep).indices.sort().values
                sd[p + "c_fc.weight"] = sd[p + "c_fc.weight"][:, idx].clone()
                sd[p + "c_fc.bias"] = sd[p + "c_fc.bias"][idx].clone()
                sd[p + "c_proj.weight"] = sd[p + "c_proj.weight"][idx].clone()
    if kind == "gated":
        cfg.intermediate_size = keep
    else:
        cfg.n_inner = keep
    return rebuild(cfg, sd), 1 - keep / inter


def build_pruned(model, tok, out: Path, sparsity: float, method: str) -> dict:
    import copy

    if method == "mlp_channels":
        pruned, achieved = prune_mlp_channels(model, sparsity)
        note = f"MLP channels kept {1 - achieved:.0%} per block (smaller matmuls)"
    else:
        pruned = copy.deepcopy(model)
        achieved = prune_magnitude(pruned, sparsity, "global" if method == "magnitude_global" else "layer")
        note = f"{achieved:.1%} of block Linear weights are zero (dense storage)"
    key = "mlp_channels_removed" if method == "mlp_channels" else "weight_sparsity"
    save_hf(
        pruned, tok, out, technique="prune", method=method, requested_sparsity=sparsity, **{key: round(achieved, 4)}
    )
    return {key: round(achieved, 4), "note": note}
