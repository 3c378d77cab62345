"""DP-SGD pieces that work inside a DeepSpeed engine (the accounting and the ledger: llmops/governance/).

Opacus has no DeepSpeed support, so we keep Opacus for what is engine-independent (accountants, noise
calibration, secure noise generation) and do per-sample clipping ourselves, in a way DeepSpeed never sees:

1. one forward; forward hooks record each trainable Linear's input x and output y;
2. `torch.autograd.grad(sum of per-sample losses, ys)` gives the backprops g without touching any `.grad`
   (so no DeepSpeed/ZeRO gradient hook fires); per-sample gradient norms follow from (x, g) exactly,
   either by materialising g^T x per sample or with the ghost-norm identity
   ||sum_t g_t x_t^T||^2 = sum_{t,s} (g_t.g_s)(x_t.x_s) when that is cheaper;
3. clip factors c_i = min(1, C / ||grad_i||) and the clipped sum G = sum_i c_i g_i^T x_i per layer;
4. DeepSpeed back-propagates the linear surrogate <G, theta> (gradient: exactly G) through its ordinary
   data-parallel reduction (ZeRO 0/1/2 alike), so the cost is one real backward, like non-private training;
5. Gaussian noise N(0, sigma^2 C^2) enters once per coordinate per step: only rank 0 adds the linear term
   <z, theta> to its last micro-batch surrogate, so the reduction carries z exactly once.
The accountant sees the *global* sample rate q = expected global batch / n_train.

The epsilon we report must hold against an informed adversary: one who reads the model card, the MLflow params and
the Prefect API, controls a run's config and can re-run, delete run directories or edit records. So:
- the Poisson sample is drawn from the OS CSPRNG (`poisson_sample`), once per step, on rank 0, and shared by
  broadcast; a public seed (`training.seed`, `privacy.noise_seed`) is used only under
  `privacy.reproducible_insecure`, which `guarantee_problems` turns into "not private";
- the noise comes from a generator of its own, seeded from the OS CSPRNG, or in secure mode from fresh OS entropy
  per tensor (`make_noise_generator`, `secure_gaussian`), never from torch's global generator (`training.seed`);
- every attempt is charged in the ledger (llmops/governance/ledger.py) before a rank starts;
- trainable parameters shared between hooked layers are refused (their per-layer norms would under-count).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from llmops.errors import PrivacyError
from llmops.governance.ledger import open_ledger

# ----------------------------------------------------------------------------------------- per-sample clipping


def dp_linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Trainable Linear layers; refuses models with trainable parameters we cannot clip per sample."""
    layers, covered = [], set()
    for name, mod in model.named_modules():
        params = [p for p in mod.parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        if not isinstance(mod, nn.Linear):
            raise PrivacyError(
                f"trainable {type(mod).__name__} '{name}' has no per-sample gradient rule",
                "training.method",
                "train with LoRA or freeze that module (full fine-tuning trains Linear layers only)",
            )
        if shared := [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad and id(p) in covered]:
            # the norm is summed per layer: a weight used by two layers would have its two gradient parts
            # measured separately, under-estimating the per-sample norm (and so the sensitivity)
            raise PrivacyError(
                f"trainable parameter '{name}.{shared[0]}' is shared with another layer; per-sample norms would be "
                "under-estimated",
                "training.method",
                "untie the weights, freeze the shared parameter, or train with LoRA (adapters are never shared)",
            )
        layers.append((name, mod))
        covered.update(id(p) for p in params)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    if missing:
        raise PrivacyError(
            f"trainable parameters outside Linear layers: {missing[:3]}", "training.method", "freeze them or use LoRA"
        )
    if not layers:
        raise PrivacyError("model has no trainable parameters", "training.method", "check LoRA target modules")
    return layers


class PerSampleClipper:
    """Records Linear inputs/outputs in forward; turns per-sample losses into clip factors."""

    def __init__(self, model: nn.Module, max_grad_norm: float, ghost: str = "auto"):
        self.layers = dp_linear_modules(model)
        self.max_grad_norm = max_grad_norm
        self.ghost = ghost  # "auto" picks the cheaper of ghost-norm and materialised per layer
        self._calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._handles = []
        self.recording = False

    def __enter__(self) -> PerSampleClipper:
        for _, mod in self.layers:
            self._handles.append(mod.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, mod, inputs, output) -> None:
        if self.recording and torch.is_grad_enabled():
            self._calls.setdefault(id(mod), []).append((inputs[0].detach(), output))

    @contextmanager
    def record(self):
        self._calls.clear()
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def _backprops(self, losses: torch.Tensor) -> list[tuple[nn.Linear, list, list]]:
        """(layer, inputs x, backprops g) per recorded layer; one backward to layer outputs, no .grad touched."""
        mods = {id(m): m for _, m in self.layers}
        outs = [(key, y) for key, calls in self._calls.items() for _, y in calls]
        if not outs:
            raise PrivacyError("no trainable layer ran in forward", "training", "check LoRA target modules")
        grads = torch.autograd.grad(losses.sum(), [y for _, y in outs], allow_unused=True)
        backprops: dict[int, list[torch.Tensor]] = {}
        for (key, y), g in zip(outs, grads):
            backprops.setdefault(key, []).append(torch.zeros_like(y) if g is None else g)
        layers = []
        for key, calls in self._calls.items():
            xs = [x.reshape(x.shape[0], -1, x.shape[-1]).float() for x, _ in calls]  # (B, T, d_in)
            gs = [g.reshape(g.shape[0], -1, g.shape[-1]).float() for g in backprops[key]]  # (B, T, d_out)
            layers.append((mods[key], xs, gs))
        self._calls.clear()
        return layers

    def per_sample_norms(self, losses: torch.Tensor) -> torch.Tensor:
        """||grad of losses[i] w.r.t. all trainable params||_2 for each sample i, shape (B,)."""
        return self._norms(self._backprops(losses), losses.shape[0], losses.device)

    def clipped_sum(self, losses: torch.Tensor, weights: torch.Tensor) -> tuple[list, torch.Tensor]:
        """[(param, sum_i w_i c_i grad_i)], norms: the clipped gradient sum without any parameter .grad.

        Handing DeepSpeed the linear surrogate sum_p <G_p, p> makes its backward produce exactly G, so the
        data-parallel reduction, ZeRO partitioning and optimizer see an ordinary gradient.
        """
        layers = self._backprops(losses)
        norms = self._norms(layers, losses.shape[0], losses.device)
        coef = self.clip_factors(norms) * weights.to(norms)
        grads = []
        for mod, xs, gs in layers:
            if mod.weight.requires_grad:
                gw = sum(torch.einsum("bto,bti->oi", g * coef[:, None, None], x) for x, g in zip(xs, gs))
                grads.append((mod.weight, gw))
            if mod.bias is not None and mod.bias.requires_grad:
                grads.append((mod.bias, sum((g.sum(1) * coef[:, None]).sum(0) for g in gs)))
        return grads, norms

    def _norms(self, layers, batch: int, device) -> torch.Tensor:
        sq = torch.zeros(batch, dtype=torch.float32, device=device)
        for mod, xs, gs in layers:
            sq += self._layer_sq_norms(mod, xs, gs)
        return sq.sqrt()

    def _layer_sq_norms(self, mod: nn.Linear, xs: list[torch.Tensor], gs: list[torch.Tensor]) -> torch.Tensor:
        sq = torch.zeros(xs[0].shape[0], dtype=torch.float32, device=xs[0].device)
        if mod.weight.requires_grad:
            t, d_in, d_out = xs[0].shape[1], xs[0].shape[2], gs[0].shape[2]
            use_ghost = self.ghost == "always" or (
                self.ghost == "auto" and len(xs) == 1 and t * (d_in + d_out) < d_in * d_out
            )
            if use_ghost and len(xs) == 1:
                x, g = xs[0], gs[0]
                sq += ((g @ g.transpose(1, 2)) * (x @ x.transpose(1, 2))).sum((1, 2))
            else:  # a layer called more than once needs the summed gradient before the norm
                gw = sum(torch.einsum("bto,bti->boi", g, x) for x, g in zip(xs, gs))
                sq += gw.pow(2).sum((1, 2))
        if mod.bias is not None and mod.bias.requires_grad:
            sq += sum(g.sum(1) for g in gs).pow(2).sum(1)
        return sq

    def clip_factors(self, norms: torch.Tensor) -> torch.Tensor:
        if math.isinf(self.max_grad_norm):
            return torch.ones_like(norms)
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def poisson_sample(n: int, q: float, seed: int | None = None) -> torch.Tensor:
    """Indices of a Poisson sample: each of n records independently with probability <= q.

    Without a seed every draw comes from os.urandom (64 bits per record, threshold floor(q * 2^64), so the real
    inclusion probability never exceeds the q the accountant uses). A seed is for `reproducible_insecure` only:
    anyone who knows it knows every batch, and then subsampling amplifies nothing.
    """
    import numpy as np

    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        return torch.nonzero(torch.rand(n, generator=gen) < q).flatten()
    threshold = math.floor(q * 2**64) if q < 1 else 2**64
    draws = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
    keep = np.ones(n, dtype=bool) if threshold >= 2**64 else draws < np.uint64(threshold)
    return torch.from_numpy(np.flatnonzero(keep).astype(np.int64))


def make_noise_generator(secure_mode: bool, seed: int | None) -> torch.Generator | None:
    """The generator of the DP noise: never torch's global one (which `training.seed` seeds, and that seed is
    published). Secure mode: None, and `gaussian_noise` draws every tensor from a fresh 128-bit OS-entropy key.
    Otherwise a generator of its own, seeded from the OS CSPRNG; a fixed seed is for `reproducible_insecure` only
    (predictable noise is no privacy)."""
    if secure_mode:
        if seed is not None:
            raise PrivacyError(
                "a noise seed with secure_mode makes noise predictable", "privacy.noise_seed", "remove noise_seed"
            )
        return None
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    return gen


def secure_gaussian(std: float, shape) -> torch.Tensor:
    """N(0, std^2) for secure mode: Philox keyed with 128 fresh bits from os.urandom per tensor (Opacus' own secure
    path needs torchcsprng, which has no build for torch 2), summed from 2n = 4 draws as Opacus does against the
    floating-point attacks on Gaussian sampling (arXiv 2107.10138, 5.1). Independent of every torch generator."""
    import numpy as np

    gen = np.random.Generator(np.random.Philox(key=int.from_bytes(os.urandom(16), "little")))
    z = gen.standard_normal((4, *tuple(shape))).sum(0) / 2.0
    return torch.from_numpy(z * std).float()


def gaussian_noise(params: list[torch.Tensor], std: float, generator, secure_mode: bool) -> list[torch.Tensor]:
    if secure_mode:
        if generator is not None:
            raise PrivacyError(
                "secure mode draws from the OS entropy, not from a generator",
                "privacy.secure_mode",
                "pass generator=None",
            )
        return [torch.zeros(p.shape) if std == 0 else secure_gaussian(std, p.shape) for p in params]
    if generator is None:  # torch's global generator is seeded with the published training.seed
        raise PrivacyError("noise needs its own CSPRNG-seeded generator", "privacy", "use make_noise_generator()")
    from opacus.optimizers.optimizer import _generate_noise

    return [_generate_noise(std, p.detach().float().cpu(), generator, False) for p in params]


def count_private(texts, private_paths=()) -> int:
    """How many of `texts` are private records, by normalised identity: records of `private_paths` (this run's
    train/held-out splits) or records any attempt in the deployment's ledger trained on. Text that reaches a model
    outside DP-SGD (distillation, a "public" eval set) must count zero."""
    from llmops.text.identity import text_hash
    from llmops.text.neardup import record_keys, related_pairs
    from tasks.data import read_texts

    texts = list(dict.fromkeys(texts))
    keys = [record_keys(t) for t in texts]
    private_texts = [t for p in private_paths for t in read_texts(Path(p))]
    pairs = related_pairs(keys + [record_keys(t) for t in private_texts])  # a variant or part of a split record
    private_hashes = {text_hash(t) for t in private_texts}
    hit = {i for i, t in enumerate(texts) if text_hash(t) in private_hashes}
    hit |= {a for a, b in pairs if a < len(texts) <= b} | {b for a, b in pairs if b < len(texts) <= a}
    rest = {text_hash(texts[i]): keys[i] for i in range(len(texts)) if i not in hit}
    return len(hit) + open_ledger().known(list(rest), keys=rest)
