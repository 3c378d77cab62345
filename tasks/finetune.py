"""Fine-tune a causal LM (LoRA or full) under DP-SGD, always through a DeepSpeed engine.

    python -m tasks.finetune SPEC.json                                  # one rank (what the Prefect task runs)
    torchrun --nproc_per_node 2 -m tasks.finetune SPEC.json              # N local ranks (gloo on CPU)
    deepspeed --hostfile infra/hostfile --module tasks.finetune SPEC.json  # a GPU cluster

`plan_finetune` (on the orchestrating process) resolves the privacy parameters, reserves the budget in the
deployment's ledger under a fresh attempt id and writes SPEC.json; every rank then runs `train(spec)`. Rank 0 draws
each step's Poisson sample from the OS CSPRNG and broadcasts it; each rank trains its disjoint share.
Released per-step metrics carry epsilon only: the exact training loss and batch size are shown on the local
console, never written to MLflow or Prefect. See tasks/privacy.py for why this is DP. The released loss *curve*
(`curve.json`) scores the intermediate models — DP outputs, post-processing is free — on the held-out or public
evaluation text at a few steps (`evaluation.curve_points`); no training record enters it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

from llmops.errors import LLMOpsError
from llmops.governance.evidence import output_mismatch

DS_AUTO = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class PrivacyReport(TypedDict, total=False):
    """`privacy.json` of a trained model: what the guarantee rests on (the ledger entry is the truth; this is its copy)."""

    dp_sgd: bool  # DP-SGD ran
    private: bool  # and a guarantee holds (`not_private_because` is empty)
    not_private_because: list[str]
    epsilon: float | None
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    expected_batch_size: int
    n_train: int
    accountant: str
    sampling: str
    sampling_rng: str
    secure_mode: bool
    reproducible_insecure: bool
    noise_seed: int | None
    history: list  # [sigma, q, steps] per composed segment
    dataset_fingerprint: str
    world_size: int
    method: str
    attempt_id: str


class FinetuneResult(TypedDict, total=False):
    """What `finetune` returns: the model directory, its privacy report and the ledger's view of the dataset."""

    model_path: str
    privacy: PrivacyReport
    metrics: list[dict]  # per-step metrics (local only: never logged to MLflow except epsilon)
    curve: list[dict]  # held-out loss at a few steps
    reused: bool  # the completed attempt's model was reused: nothing charged
    cumulative_epsilon: float  # the dataset's worst-record epsilon after this attempt
    budget: float | None
    run_id: str
    attempt_id: str


@dataclass
class FinetuneSpec:
    """Everything a rank needs; JSON on disk so any launcher can start ranks from it."""

    run_id: str  # content key of the run (its directory); not the ledger's charge key
    model_path: str
    train_path: str
    output_dir: str
    fingerprint: str
    n_train: int
    method: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["q_proj", "v_proj"])
    max_len: int = 128
    dtype: str = "float32"
    batch_size: int = 16  # expected global batch (Poisson: q * n_train)
    micro_batch_size: int = 4
    learning_rate: float = 5e-4
    optimizer: str = "adamw"
    steps: int = 10
    seed: int = 42
    deepspeed_config: str = "infra/deepspeed/zero0.json"
    checkpoint_every: int = 50
    world_size: int = 1
    private: bool = True
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    sample_rate: float = 0.01
    sampling: str = "poisson"
    secure_mode: bool = False
    reproducible_insecure: bool = False  # seeded batches and noise: never a privacy guarantee
    noise_seed: int | None = None
    delta: float = 1e-5
    accountant: str = "prv"
    ghost: str = "auto"
    attempt_id: str = ""  # the ledger's charge key for this training attempt (random, from plan_finetune)
    eval_path: str = ""  # held-out (or public) text for the loss curve; never a training record
    curve_points: int = 0  # held-out evaluations during training (plus one before the first step); 0 = none
    curve_records: int = 16
    base_digest: str = ""  # dir_digest of model_path (the base the plan was reserved for; the rank re-hashes it)

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path) -> FinetuneSpec:
        return cls(**json.loads(Path(path).read_text()))


# ------------------------------------------------------------------------------------------ DeepSpeed config


def deepspeed_config(path: str | Path, micro: int, gas: int, world: int, dtype: str, private: bool) -> dict:
    """Load a JSON from infra/deepspeed/ and fill the values the run config owns ("auto")."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LLMOpsError(
            f"cannot read DeepSpeed config ({e})", str(path), "use one of infra/deepspeed/*.json"
        ) from None
    owned = {
        "train_batch_size": micro * gas * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
    }
    for key, value in owned.items():
        if cfg.get(key, "auto") not in ("auto", value):
            raise LLMOpsError(
                f"{key}={cfg[key]} conflicts with the run config ({value})",
                str(path),
                f'set "{key}": "auto"; the batch sizes come from training.*',
            )
        cfg[key] = value
    cfg.setdefault("bf16", {})["enabled"] = dtype == "bfloat16"
    if cfg.get("fp16", {}).get("enabled"):
        raise LLMOpsError("fp16 loss scaling is not supported with DP", str(path), "use bf16 or fp32")
    if private and cfg.get("gradient_clipping", 0):
        raise LLMOpsError(
            "DeepSpeed gradient_clipping would clip the noisy aggregate, not per sample",
            str(path),
            'set "gradient_clipping": 0 (DP clipping is privacy.max_grad_norm)',
        )
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage > 2:
        raise LLMOpsError(f"ZeRO stage {stage} is not supported with DP", str(path), "use zero0/1/2 configs")
    # We own the accumulation boundary: a variable Poisson batch is split into a fixed number of micro-batches.
    cfg["managed_gradient_accumulation"] = False
    return cfg


# -------------------------------------------------------------------------------------------------- sampling


def global_batch(step: int, spec: FinetuneSpec, generator_seed: int | None):
    """Indices of the global batch for `step`. `generator_seed=None`: a fresh CSPRNG Poisson sample (call on one
    rank and share it: `shared_batch`); a seed reproduces the batches (reproducible_insecure only)."""
    import torch

    from tasks.privacy import poisson_sample

    if spec.sampling == "poisson":
        return poisson_sample(
            spec.n_train, spec.sample_rate, None if generator_seed is None else generator_seed * 1_000_003 + step
        )
    per_epoch = max(spec.n_train // spec.batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(spec.n_train, generator=torch.Generator().manual_seed(spec.seed * 7919 + epoch))
    return perm[k * spec.batch_size : (k + 1) * spec.batch_size]


def shared_batch(step: int, spec: FinetuneSpec, generator_seed: int | None, world: int, group=None):
    """The one global sample of `step`: drawn on rank 0, broadcast to every rank (gloo), so that all ranks train
    disjoint shares of the same Poisson sample. Ranks drawing their own samples would put a record into two ranks'
    shares of one step (sensitivity 2C) and the result would not be a Poisson sample."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return global_batch(step, spec, generator_seed)
    rank = dist.get_rank()
    idx = global_batch(step, spec, generator_seed) if rank == 0 else None
    size = torch.tensor([len(idx) if idx is not None else 0], dtype=torch.long)
    dist.broadcast(size, 0, group=group)
    if rank != 0:
        idx = torch.empty(int(size), dtype=torch.long)
    if int(size):
        dist.broadcast(idx, 0, group=group)
    return idx


def rank_share(idx, rank: int, world: int):
    """This rank's disjoint part of the global sample."""
    return idx[rank::world]


def grad_accumulation_steps(spec: FinetuneSpec) -> int:
    return max(1, math.ceil(spec.batch_size / (spec.world_size * spec.micro_batch_size)))


# ---------------------------------------------------------------------------------------------- model set-up


def prepare_trainable(model, spec: FinetuneSpec):
    """LoRA adapters (base frozen) or full fine-tuning of the Linear layers (embeddings/norms/head frozen)."""
    import torch.nn as nn

    if spec.method == "lora":
        from peft import LoraConfig, get_peft_model

        names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        if missing := [t for t in spec.lora_target_modules if t not in names]:
            raise LLMOpsError(
                f"LoRA target modules {missing} not in the model (Linear layers: {sorted(names)[:8]})",
                "training.lora_target_modules",
                "pick names from that list",
            )
        cfg = LoraConfig(
            r=spec.lora_r,
            lora_alpha=spec.lora_alpha,
            lora_dropout=spec.lora_dropout,
            target_modules=spec.lora_target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, cfg)
    out_emb = model.get_output_embeddings()
    for mod in model.modules():
        train = isinstance(mod, nn.Linear) and mod is not out_emb  # the head is tied to the embeddings
        for p in mod.parameters(recurse=False):
            p.requires_grad_(train)
    return model


def loss_module(model):
    """Wrap the LM so DeepSpeed's engine output is a zero-valued *gate*, and per-sample losses go on the side.

    DeepSpeed hooks its backward prologue onto the tensors its forward returns. The clipping pass differentiates
    the per-sample losses w.r.t. layer outputs (no parameter .grad); if that went through a hooked tensor,
    DeepSpeed would start a backward it never finishes. The gate is `0 * sum(trainable params)`: it depends on
    no activation (so backpropagating it is free) and adding it to the surrogate loss puts DeepSpeed's
    prologue exactly on the real backward.
    """
    import torch.nn as nn

    from tasks.lm import per_sample_loss

    class LossModule(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.model = lm
            self.losses = None

        def forward(self, input_ids, attention_mask):
            self.losses = per_sample_loss(self.model, input_ids, attention_mask)
            return sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0

    return LossModule(model)


def init_distributed():
    import deepspeed
    import torch

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------- train


def train(spec: FinetuneSpec) -> dict | None:
    """One rank's training loop. Rank 0 writes the model, privacy.json and metrics; returns them."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if _has_cuda() else "cpu")
    import deepspeed
    import torch

    from llmops.governance.accounting import make_accountant
    from tasks.lm import encode
    from tasks.model import load_model
    from tasks.privacy import PerSampleClipper, gaussian_noise, make_noise_generator

    rank, world = init_distributed()
    if world != spec.world_size:
        raise LLMOpsError(
            f"launched with {world} ranks but the spec says {spec.world_size}",
            "training.world_size",
            "launch as many ranks as training.world_size",
        )
    if spec.noise_seed is not None and not spec.reproducible_insecure:
        raise LLMOpsError(
            "noise_seed without reproducible_insecure",
            "privacy.noise_seed",
            "remove noise_seed, or set privacy.reproducible_insecure: true (never private)",
        )
    import torch.distributed as dist

    sample_group = dist.new_group(backend="gloo") if world > 1 else None  # CPU broadcast even when NCCL trains
    from llmops.governance.ledger import read_regular

    raw_train = read_regular(spec.train_path)  # read once: the bytes hashed against the plan are the bytes trained on
    raw_eval = read_regular(spec.eval_path) if spec.eval_path and spec.curve_points > 0 and rank == 0 else None
    ledger = _attempt_ledger(spec, rank, raw_train, raw_eval)  # None: a bare spec (tests, benchmarks)
    torch.manual_seed(spec.seed)
    model, tok = load_model(spec.model_path, spec.dtype)
    model = prepare_trainable(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    gas = grad_accumulation_steps(spec)
    ds_cfg = deepspeed_config(spec.deepspeed_config, spec.micro_batch_size, gas, world, spec.dtype, spec.private)
    optimizer = (
        torch.optim.SGD(params, lr=spec.learning_rate)
        if spec.optimizer == "sgd"
        else torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=0.0)
    )
    engine, *_ = deepspeed.initialize(
        model=loss_module(model), optimizer=optimizer, config=ds_cfg, model_parameters=params
    )
    device = engine.device
    texts = _parse_jsonl_texts(raw_train)
    if len(texts) != spec.n_train:
        raise LLMOpsError(
            f"train split has {len(texts)} records, plan said {spec.n_train}",
            spec.train_path,
            "re-run the flow (the split changed under the run)",
        )
    data = encode(tok, texts, spec.max_len)
    ckpt_dir = Path(spec.output_dir) / "checkpoints"
    start, history, metrics, curve = 0, [], [], []
    tag = _resume_tag(spec, ckpt_dir, ledger, rank, world, sample_group)
    if ledger is not None:  # one training per (attempt, start step): no best-of-k on one charge
        ledger.claim_launch(spec.attempt_id, int(tag.removeprefix("step")) if tag else 0)
    if tag:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False, load_optimizer_states=True)
        if client.get("attempt_id") != spec.attempt_id:
            from llmops.errors import PrivacyError

            raise PrivacyError(
                "checkpoint belongs to another training attempt than the one the ledger charged",
                str(ckpt_dir),
                "delete the checkpoints directory and re-run (a new attempt is charged)",
            )
        start, metrics, curve = (
            int(tag.removeprefix("step")),
            client["metrics"][: int(tag.removeprefix("step"))],
            client.get("curve", []),
        )
        # the history is the ledger's (the plan's sigma and q for `start` steps), never the checkpoint's own claim
        history = [[spec.noise_multiplier, spec.sample_rate, start]] if spec.private else []
        if rank == 0:
            print(f"resumed run {spec.run_id} at step {start}/{spec.steps}", flush=True)
    accountant = make_accountant(spec.accountant, history)
    sample_seed = spec.seed if spec.reproducible_insecure else None  # else: CSPRNG, drawn on rank 0 per step
    noise_gen = make_noise_generator(spec.secure_mode, None)
    step_seconds = []
    clipper = PerSampleClipper(engine.module.model, spec.max_grad_norm, spec.ghost) if spec.private else None
    scale = world / spec.batch_size  # DeepSpeed averages over ranks; we want (sum of clipped grads) / E[batch]
    bar = _progress(rank, start, spec.steps, Path(spec.output_dir) / PROGRESS_MARKER)
    points = curve_steps(spec.steps, spec.curve_points)
    heldout = _curve_data(spec, tok, rank, raw_eval)
    if heldout is not None and start == 0 and 0 in points:
        curve.append({"step": 0, "eval_loss": heldout_point(engine.module.model, heldout, device)})
    engine.train()
    with clipper if clipper else _null():
        for step in range(start, spec.steps):
            t0 = time.perf_counter()
            idx = shared_batch(step, spec, sample_seed, world, sample_group)
            chunks = [c for c in torch.tensor_split(rank_share(idx, rank, world), gas)]
            loss_sum, n_samples, n_tokens = 0.0, 0, 0
            for k, chunk in enumerate(chunks):
                weight = torch.ones(len(chunk)) if len(chunk) else torch.zeros(1)
                chunk = chunk if len(chunk) else torch.zeros(1, dtype=torch.long)  # keeps collectives in lockstep
                ids, mask = data["input_ids"][chunk].to(device), data["attention_mask"][chunk].to(device)
                with clipper.record() if clipper else _null():
                    gate = engine(ids, mask)
                losses = engine.module.losses
                weight = weight.to(device)
                if clipper:  # surrogate <G, theta>: its gradient is exactly the clipped sum G
                    grads, _ = clipper.clipped_sum(losses, weight)
                    loss = sum((g.to(p.dtype) * p).sum() for p, g in grads) * scale + gate
                else:
                    loss = (weight * losses.float()).sum() * scale + gate
                if clipper and rank == 0 and k == len(chunks) - 1 and spec.noise_multiplier > 0:
                    if spec.noise_seed is not None:  # reproducible_insecure: resumed == uninterrupted
                        noise_gen.manual_seed(spec.noise_seed * 1_000_003 + step)
                    noise = gaussian_noise(
                        params, spec.noise_multiplier * spec.max_grad_norm, noise_gen, spec.secure_mode
                    )
                    loss = loss + sum((z.to(p.device, p.dtype) * p).sum() for z, p in zip(noise, params)) * scale
                engine.backward(loss, scale_wrt_gas=False)
                loss_sum += float((weight * losses.detach().float()).sum())
                n_samples += int(weight.sum())
                n_tokens += int((mask.sum(1) * weight).sum())
            engine.step()
            if spec.private:
                accountant.step(noise_multiplier=spec.noise_multiplier, sample_rate=spec.sample_rate)
            history = [list(h) for h in accountant.history]
            m = _step_metrics(step, loss_sum, n_samples, n_tokens, world, time.perf_counter() - t0, spec, history)
            _update_bar(bar, m)  # exact loss/batch: local console only
            metrics.append({"step": m["step"], "epsilon": m["epsilon"]})  # what may leave the machine
            step_seconds.append(m["seconds"])
            if heldout is not None and step + 1 in points:  # the model after a DP step, scored on held-out text
                curve.append({"step": step + 1, "eval_loss": heldout_point(engine.module.model, heldout, device)})
            if (step + 1) % spec.checkpoint_every == 0 and step + 1 < spec.steps:
                _checkpoint(engine, ckpt_dir, step + 1, history, metrics, spec.attempt_id, curve, ledger, world)
    if bar is not None:
        bar.close()
    if rank == 0:  # step_seconds: in memory for benchmarks, never persisted (step time tracks batch size)
        return _save_outputs(engine, tok, spec, history, metrics, curve) | {"step_seconds": step_seconds}
    return None


def _step_metrics(step, loss_sum, n_samples, n_tokens, world, seconds, spec, history) -> dict:
    import torch
    import torch.distributed as dist

    t = torch.tensor([loss_sum, n_samples, n_tokens], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    from llmops.governance.accounting import epsilon_of

    eps = epsilon_of(history, spec.delta, spec.accountant) if spec.private else math.inf
    return {
        "step": step + 1,
        "loss": float(t[0] / max(t[1], 1)),
        "batch": int(t[1]),
        "tokens": int(t[2]),
        "tokens_per_s": float(t[2] / seconds),
        "seconds": round(seconds, 3),
        "epsilon": eps,
    }


def curve_steps(steps: int, points: int) -> set[int]:
    """The steps after which the held-out loss is measured: 0 (the base model), then `points` evenly spaced steps
    ending at the last one. Pure."""
    if points <= 0 or steps <= 0:
        return set()
    return {0} | {max(1, round(i * steps / points)) for i in range(1, points + 1)}


def _parse_jsonl_texts(raw: bytes) -> list[str]:
    """`tasks.data.read_texts` on bytes already read (and hashed)."""
    return [json.loads(line)["text"] for line in raw.decode("utf-8").splitlines() if line.strip()]


def _curve_data(spec: FinetuneSpec, tok, rank: int, raw: bytes | None = None):
    """Rank 0's encoded evaluation records for the loss curve (None: no curve on this rank); from the bytes the plan
    check hashed when given."""
    if rank != 0 or spec.curve_points <= 0 or not spec.eval_path:
        return None
    from tasks.data import read_texts
    from tasks.lm import encode

    texts = (_parse_jsonl_texts(raw) if raw is not None else read_texts(Path(spec.eval_path)))[: spec.curve_records]
    return encode(tok, texts, spec.max_len) if texts else None


def heldout_point(model, data: dict, device, batch: int = 8) -> float:
    """Token-weighted held-out loss of the current model (no gradient, no RNG: training is unaffected)."""
    import torch

    from tasks.lm import token_nll

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data["input_ids"]), batch):
            nll, n = token_nll(
                model, data["input_ids"][i : i + batch].to(device), data["attention_mask"][i : i + batch].to(device)
            )
            total, count = total + nll, count + n
    model.train(was_training)
    return total / max(count, 1)


def _checkpoint(
    engine, ckpt_dir: Path, step: int, history, metrics, attempt_id: str, curve=(), ledger=None, world: int = 1
) -> None:
    """Save a checkpoint; rank 0 records its digest and step in the ledger (the only checkpoint a resume may load),
    then removes older ones: a kill between save and record leaves the previous recorded checkpoint in place."""
    engine.save_checkpoint(
        str(ckpt_dir),
        tag=f"step{step}",
        exclude_frozen_parameters=True,
        client_state={
            "step": step,
            "history": history,
            "metrics": metrics,
            "attempt_id": attempt_id,
            "curve": list(curve),
        },
    )
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's shard is on disk before rank 0 hashes the step directory
    if engine.global_rank == 0:
        if ledger is not None:
            from llmops.files import dir_digest

            ledger.checkpoint(attempt_id, step, dir_digest(ckpt_dir / f"step{step}"))
        for old in ckpt_dir.glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)


def _attempt_ledger(spec: FinetuneSpec, rank: int, raw_train: bytes = b"", raw_eval: bytes | None = None):
    """Rank 0's check that spec.json (a file in the writable run dir) is the plan the ledger reserved this attempt
    for: a lowered sigma, a swapped training file (hashed from the bytes this rank trains on), another base model
    (its directory re-hashed), other loss-curve text or another dataset's attempt id is refused before any step.
    Returns the ledger for recording checkpoints (rank 0), or None for a spec with no attempt (tests, benchmarks:
    their outputs are never accepted by `finish_ledger`)."""
    if not spec.attempt_id or rank != 0:
        return None
    import hashlib
    from dataclasses import replace

    from llmops.errors import PrivacyError
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger, plan_mismatch, privacy_plan

    ledger = open_ledger()
    entry = ledger.entry(spec.attempt_id)
    if entry is None:
        if spec.private:
            raise PrivacyError(
                f"training attempt {spec.attempt_id} is not reserved in the privacy ledger",
                spec.output_dir,
                "run training through `llmops train` (it reserves the budget)",
            )
        return None
    if entry.status != "reserved":
        raise PrivacyError(
            f"training attempt {spec.attempt_id} is '{entry.status}' in the ledger: it cannot train again",
            spec.output_dir,
            "re-run the flow: it reuses the recorded model or plans a new attempt",
        )
    actual = replace(spec, base_digest=dir_digest(Path(spec.model_path)))  # what will really be loaded
    plan = privacy_plan(
        actual,
        hashlib.sha256(raw_train).hexdigest(),
        hashlib.sha256(raw_eval).hexdigest() if raw_eval is not None else None,
    )
    if diff := plan_mismatch(entry.plan, plan):
        raise PrivacyError(
            f"spec.json differs from the plan the ledger reserved ({'; '.join(diff[:3])})",
            spec.output_dir,
            "re-run the flow (the run dir was changed; a new attempt is charged)",
        )
    return ledger


def _resume_tag(spec: FinetuneSpec, ckpt_dir: Path, ledger, rank: int, world: int, group) -> str | None:
    """The checkpoint to resume from, decided on rank 0 and shared: with a ledger, only the ledger's latest recorded
    checkpoint of this attempt, and only if its files hash to the recorded digest (a forged or swapped checkpoint is
    refused, not loaded); no recorded checkpoint means step 0 (unrecorded files are ignored). A bare spec
    (no attempt) resumes from DeepSpeed's `latest`."""
    tag = None
    if rank == 0:
        if ledger is not None:
            from llmops.errors import PrivacyError
            from llmops.files import dir_digest

            rec = ledger.last_checkpoint(spec.attempt_id)
            if rec is not None:
                step, digest = rec
                path = ckpt_dir / f"step{step}"
                if not path.is_dir() or not any(path.iterdir()) or dir_digest(path) != digest:
                    raise PrivacyError(
                        f"the checkpoint at step {step} is not the one the ledger recorded for attempt "
                        f"{spec.attempt_id}",
                        str(path),
                        "delete the run dir and re-run: a new attempt is planned and charged in full",
                    )
                tag = f"step{step}"
        elif not spec.attempt_id and (ckpt_dir / "latest").is_file():
            tag = (ckpt_dir / "latest").read_text().strip() or None
    if world > 1:
        import torch.distributed as dist

        box = [tag]
        dist.broadcast_object_list(box, src=0, group=group)
        tag = box[0]
    return tag


def _save_outputs(engine, tok, spec: FinetuneSpec, history, metrics, curve=()) -> dict:
    from llmops.governance.accounting import epsilon_of, guarantee_problems

    out = Path(spec.output_dir)
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = engine.module.model
    if spec.method == "lora":
        shutil.rmtree(out / "adapter", ignore_errors=True)
        model.save_pretrained(out / "adapter")  # the adapter alone (small; base = spec.model_path)
        model = model.merge_and_unload()  # a plain HF model: later steps need no PEFT
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    privacy = {
        "dp_sgd": spec.private,
        "epsilon": epsilon_of(history, spec.delta, spec.accountant) if spec.private else None,
        "delta": spec.delta,
        "noise_multiplier": spec.noise_multiplier if spec.private else 0.0,
        "max_grad_norm": spec.max_grad_norm,
        "sample_rate": spec.sample_rate,
        "steps": spec.steps,
        "expected_batch_size": spec.batch_size,
        "n_train": spec.n_train,
        "accountant": spec.accountant,
        "sampling": spec.sampling,
        "sampling_rng": "seeded" if spec.reproducible_insecure else "os.urandom",
        "secure_mode": spec.secure_mode,
        "reproducible_insecure": spec.reproducible_insecure,
        "noise_seed": spec.noise_seed,
        "history": history,
        "dataset_fingerprint": spec.fingerprint,
        "world_size": spec.world_size,
        "method": spec.method,
        "attempt_id": spec.attempt_id,
    }
    privacy["not_private_because"] = guarantee_problems(privacy)
    privacy["private"] = not privacy["not_private_because"]  # a guarantee holds, not merely "DP-SGD ran"
    (tmp / "privacy.json").write_text(json.dumps(privacy, indent=2))
    shutil.rmtree(out / "model", ignore_errors=True)
    tmp.rename(out / "model")
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "curve.json").write_text(json.dumps(list(curve)))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return {"model_path": str(out / "model"), "privacy": privacy, "metrics": metrics, "curve": list(curve)}


PROGRESS_MARKER = ".progress"


def _progress(rank: int, start: int, total: int, marker: Path | None = None):
    if rank != 0:
        return None
    from tqdm.auto import tqdm

    from llmops import console

    out = console.terminal()  # a person's terminal even when this rank's stderr goes to the run's log
    if marker is not None:
        try:
            marker.touch()  # the parent's "starting ranks" heartbeat stops: this bar reports from here on
        except OSError:
            pass
    if not out.isatty():  # a CI log or `| tee`: a few plain lines instead of carriage-return redraws
        return _ProgressLines(out, start, total)
    return tqdm(total=total, initial=start, desc="DP fine-tune", unit="step", dynamic_ncols=True, file=out)


class _ProgressLines:
    """tqdm's update/set_postfix/close as plain lines: the first step, each fifth of the run, and at least one line
    every 30 s: step, epsilon, elapsed time, ETA."""

    def __init__(self, out, start: int, total: int, every: float = 30.0):
        import threading

        self.out, self.n, self.total, self.t0, self.start = out, start, total, time.time(), start
        self.marks = {start + 1} | {max(1, round(total * i / 5)) for i in range(1, 6)}
        self.every, self.last = every, time.time()
        self._print(f"DP fine-tune: {total - start} step(s) to train" + (f" (resumed at {start})" if start else ""))
        self._done = threading.Event()  # a step longer than `every` still gets a line every `every` seconds
        threading.Thread(target=self._beat, daemon=True).start()

    def _print(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')}  {text}", file=self.out, flush=True)
        self.last = time.time()

    def _beat(self) -> None:
        while not self._done.wait(min(1.0, self.every / 3)):
            if time.time() - self.last >= self.every:
                self._print(f"DP fine-tune: step {self.n + 1}/{self.total} running, {time.time() - self.t0:.0f} s")

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix(self, **values) -> None:
        now = time.time()
        if self.n in self.marks or now - self.last >= self.every:
            done = self.n - self.start
            eta = (now - self.t0) / done * (self.total - self.n) if done else 0
            self._print(
                f"DP fine-tune: step {self.n}/{self.total}, epsilon {values.get('eps', '?')}, "
                f"{now - self.t0:.0f} s, ETA {eta:.0f} s"
            )

    def close(self) -> None:
        self._done.set()


def _update_bar(bar, m: dict) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(
            loss=f"{m['loss']:.3f}", batch=m["batch"], eps=f"{m['epsilon']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}"
        )


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    argv = argv if argv is not None else sys.argv[1:]
    if len(argv) != 1:
        print("usage: python -m tasks.finetune SPEC.json", file=sys.stderr)
        return 2
    from llmops import console

    console.child_start()  # under `llmops train`: library noise to the run's log, the progress bar to the terminal
    try:
        result = train(FinetuneSpec.load(argv[0]))
    except LLMOpsError as e:
        print(f"error: {e}", file=sys.stderr)  # the parent's error names the log this lands in
        return 2
    if result is not None:
        print(json.dumps({"model_path": result["model_path"], "epsilon": result["privacy"]["epsilon"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------------------------------ orchestration side


def privacy_budget(cfg) -> float:
    """The per-record budget in force: the governance file's, lowered (never raised) by the run config."""
    from llmops.governance.policy import load_governance

    governed = load_governance().privacy.dataset_budget_epsilon
    asked = cfg.privacy.dataset_budget_epsilon
    return governed if asked is None else min(governed, asked)


def plan_finetune(cfg, data: dict, model: dict) -> tuple[FinetuneSpec, float]:
    """Resolve sigma/delta/steps, pick the run dir, reserve the privacy budget for this attempt in the deployment's
    ledger. Returns (spec, cumulative eps). A run dir whose intact checkpoint (or finished model) belongs to an
    attempt the ledger knows continues that attempt; anything else is a new attempt, charged in full."""
    import hashlib

    from llmops.errors import PrivacyError
    from llmops.governance.accounting import epsilon_of, noise_for_target
    from llmops.governance.ledger import new_attempt_id, open_ledger, plan_problems, privacy_plan
    from llmops.governance.policy import load_governance

    p, t = cfg.privacy, cfg.training
    governed = load_governance().privacy
    n = int(data["n_train"])
    if t.batch_size > n:
        raise LLMOpsError(
            f"batch_size {t.batch_size} exceeds the {n} training records",
            "training.batch_size",
            "lower training.batch_size or add data",
        )
    q = t.batch_size / n
    steps = t.max_steps or max(1, math.ceil(t.epochs / q))
    delta = p.delta or governed.budget_delta
    if p.enabled and governed.budget_delta >= 1.0 / n:
        raise LLMOpsError(
            f"the budget's delta {governed.budget_delta:g} is not below 1/n = {1 / n:g}",
            "governance file: privacy.budget_delta",
            "an admin lowers privacy.budget_delta "
            "(`llmops governance set privacy.budget_delta 1e-6`), or train on more records",
        )
    if p.enabled and delta >= 1.0 / n:
        raise LLMOpsError(
            f"delta {delta:g} is not below 1/n = {1 / n:g}",
            "privacy.delta",
            "use a delta well below 1/n_train (default: the governance's privacy.budget_delta)",
        )
    sigma = 0.0
    if p.enabled:
        sigma = (
            p.noise_multiplier
            if p.noise_multiplier is not None
            else noise_for_target(p.target_epsilon, delta, q, steps, p.accountant)
        )
    key = json.dumps(
        [
            data["fingerprint"],
            model["digest"],
            p.model_dump(mode="json"),
            t.model_dump(mode="json"),
            cfg.model.max_seq_len,
            cfg.model.dtype,
        ],
        sort_keys=True,
    )
    run_id = hashlib.sha256(key.encode()).hexdigest()[:16]
    out = Path(cfg.state_dir) / "runs" / run_id
    spec = FinetuneSpec(
        run_id=run_id,
        model_path=model["path"],
        train_path=data["train_path"],
        output_dir=str(out),
        fingerprint=data.get("source_fingerprint", data["fingerprint"]),
        n_train=n,
        method=t.method,
        lora_r=t.lora_r,
        lora_alpha=t.lora_alpha,
        lora_dropout=t.lora_dropout,
        lora_target_modules=list(t.lora_target_modules),
        max_len=cfg.model.max_seq_len,
        dtype=cfg.model.dtype,
        batch_size=t.batch_size,
        micro_batch_size=t.micro_batch_size,
        learning_rate=t.learning_rate,
        optimizer=t.optimizer,
        steps=steps,
        seed=t.seed,
        deepspeed_config=str(t.deepspeed_config),
        checkpoint_every=t.checkpoint_every,
        world_size=t.world_size,
        private=p.enabled,
        noise_multiplier=sigma,
        max_grad_norm=p.max_grad_norm,
        sample_rate=q,
        sampling=p.sampling,
        secure_mode=p.secure_mode,
        noise_seed=p.noise_seed,
        delta=delta,
        accountant=p.accountant,
        reproducible_insecure=p.reproducible_insecure,
        eval_path=curve_eval_path(cfg, data),
        curve_points=cfg.evaluation.curve_points,
        curve_records=cfg.evaluation.curve_records,
        base_digest=model["digest"],
    )
    # DP configuration errors surface here, before the ledger reserves anything (not inside a rank, after it did)
    deepspeed_config(
        spec.deepspeed_config,
        spec.micro_batch_size,
        grad_accumulation_steps(spec),
        spec.world_size,
        spec.dtype,
        spec.private,
    )
    cumulative = math.inf
    if p.enabled:
        ledger = open_ledger()
        if why := ledger.unaccounted(spec.base_digest):  # its training records were never charged
            raise PrivacyError(
                f"the base model is the output of a run the ledger did not account ({why})",
                f"model.path {model['path']}",
                "fine-tune from the original base model, or from a "
                "private run's model (its records are composed by the ledger)",
            )
        plan = privacy_plan(spec)
        spec.attempt_id = _continuing_attempt(out, ledger, plan) or new_attempt_id()
        cumulative = ledger.reserve(
            spec.attempt_id,
            spec.fingerprint,
            [[sigma, q, steps]],
            delta,
            p.accountant,
            privacy_budget(cfg),
            records=training_record_hashes(data),
            keys=training_record_keys(data),
            run_key=run_id,
            plan=plan,
            problems=plan_problems(plan, epsilon_of([[sigma, q, steps]], delta, p.accountant)),
            budget_delta=governed.budget_delta,
        )
    else:  # nothing to charge: a non-private run is never a candidate (guarantee_problems)
        spec.attempt_id = _spec_attempt(out) or new_attempt_id()
    if not (out / "spec.json").is_file() or _spec_attempt(out) != spec.attempt_id:
        for stale in ("checkpoints", "model"):  # another attempt's state: never resumed or reused by this one
            shutil.rmtree(out / stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    spec.save(out / "spec.json")
    return spec, cumulative


def curve_eval_path(cfg, data: dict) -> str:
    """The text the loss curve is scored on: the same as the final evaluation (public text when the team provides
    it, refused if any of it is a private record; else the held-out split)."""
    e = cfg.evaluation
    if e.curve_points <= 0:
        return ""
    if e.public_eval_path:
        from tasks.evaluation import public_eval_split

        return public_eval_split(
            str(e.public_eval_path), str(Path(cfg.state_dir) / "public-eval"), [data["train_path"], data["eval_path"]]
        )
    return data["eval_path"]


def _spec_attempt(out: Path) -> str | None:
    try:
        return json.loads((out / "spec.json").read_text()).get("attempt_id") or None
    except (OSError, ValueError):
        return None


def _continuing_attempt(out: Path, ledger, plan: dict) -> str | None:
    """The attempt id to continue in `out`: the ledger's row of the attempt spec.json names must have been reserved
    for exactly this plan (same run key, dataset file, records, sigma, q, steps, delta...), and its evidence must be
    the ledger's: an unfinished attempt whose latest *recorded* checkpoint is there with the recorded digest (resume),
    or a completed one whose model dir hashes to the recorded model digest (reuse, nothing is trained). spec.json,
    checkpoints and model files are the run dir's, writable by whoever runs training: they are caches, not evidence."""
    from llmops.files import dir_digest
    from llmops.governance.ledger import plan_mismatch

    attempt = _spec_attempt(out)
    entry = ledger.entry(attempt) if attempt else None
    if entry is None or plan_mismatch(entry.plan, plan):
        return None
    if entry.status == "reserved":
        rec = ledger.last_checkpoint(attempt)
        path = out / "checkpoints" / f"step{rec[0]}" if rec else None
        ok = path is not None and path.is_dir() and any(path.iterdir()) and dir_digest(path) == rec[1]
        return attempt if ok else None
    model = out / "model"
    if (
        entry.status == "completed"
        and entry.model_digest
        and model.is_dir()
        and dir_digest(model) == entry.model_digest
    ):
        return attempt
    return None


def training_record_hashes(data: dict) -> list[str]:
    """Content hashes of the records DP training will read, as the ledger's record identities. For a redacted copy,
    each record maps back to the original record(s) it came from (the same person's data)."""
    from llmops.text.identity import text_hash
    from tasks.data import read_texts

    hashes = [text_hash(t) for t in read_texts(Path(data["train_path"]))]
    if data.get("source_map"):  # a cache in the state dir: it may add identities, never remove the trained text's
        sources = json.loads(Path(data["source_map"]).read_text())
        hashes = [s for h in hashes for s in [h, *(x for x in sources.get(h, []) if isinstance(x, str))]]
    return sorted(set(hashes))


def training_record_keys(data: dict) -> dict[str, list[int]]:
    """The near-duplicate keys (llmops/text/neardup.py) of each record identity `training_record_hashes` returns: the
    ledger relates variants, parts and concatenations of earlier-trained records to them. A redacted record's
    sources get the redacted text's keys (the original text is not kept; the redacted one is its near-copy)."""
    from llmops.text.identity import text_hash
    from llmops.text.neardup import record_keys
    from tasks.data import read_texts

    out: dict[str, list[int]] = {}
    sources = json.loads(Path(data["source_map"]).read_text()) if data.get("source_map") else {}
    for t in read_texts(Path(data["train_path"])):
        h, keys = text_hash(t), record_keys(t)
        for s in [h, *(x for x in sources.get(h, []) if isinstance(x, str))]:
            out[s] = sorted(set(out.get(s, [])) | set(keys))
    return out


def launch(spec: FinetuneSpec, timeout_s: float | None = None) -> FinetuneResult:
    """Run the ranks: in a subprocess (1 rank) or via torchrun (N local ranks); read rank 0's outputs."""
    out = Path(spec.output_dir)
    done = out / "model" / "privacy.json"
    if done.is_file() and not _reusable(spec, out / "model"):  # planted or stale: never the evidence of anything
        shutil.rmtree(out / "model", ignore_errors=True)
    if done.is_file():  # the completed attempt's own model (ledger digest): reuse, charge nothing new
        return {
            "model_path": str(out / "model"),
            "privacy": json.loads(done.read_text()),
            "metrics": json.loads((out / "metrics.json").read_text()),
            "curve": _read_curve(out),
            "reused": True,
        }
    spec_path = out / "spec.json"
    if spec.world_size == 1:
        cmd = [sys.executable, "-m", "tasks.finetune", str(spec_path)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={spec.world_size}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "tasks.finetune",
            str(spec_path),
        ]
    from llmops import console

    proc = subprocess.run(
        cmd, env=rank_env(), timeout=timeout_s, stdout=subprocess.PIPE, text=True, stderr=console.child_stderr()
    )
    if proc.returncode != 0:
        log = console.log_path()
        raise LLMOpsError(
            f"training ranks exited with code {proc.returncode}" + _rank_error(log),
            str(out),
            f"see {log if log else 'the log above'}; re-running the flow resumes from the last checkpoint",
        )
    return {
        "model_path": str(out / "model"),
        "privacy": json.loads(done.read_text()),
        "metrics": json.loads((out / "metrics.json").read_text()),
        "curve": _read_curve(out),
        "reused": False,
    }


def _reusable(spec: FinetuneSpec, model: Path) -> bool:
    """A finished model dir may be reused only if the ledger recorded exactly these files for this completed attempt
    (a bare or non-private spec has no ledger evidence to protect: its model is never promotable)."""
    if not spec.private or not spec.attempt_id:
        return True
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger

    entry = open_ledger().entry(spec.attempt_id)
    return bool(
        entry and entry.status == "completed" and entry.model_digest and dir_digest(model) == entry.model_digest
    )


def _read_curve(out: Path) -> list[dict]:
    try:
        return json.loads((out / "curve.json").read_text())
    except (OSError, ValueError):
        return []


def _rank_error(log) -> str:
    """The last `error: ...` a rank printed into the run's log, so the one error line says what went wrong."""
    try:
        lines = [x for x in Path(log).read_text(errors="replace").splitlines() if x.startswith("error: ")]
    except (OSError, TypeError):
        return ""
    return f" ({lines[-1][7:300]})" if lines else ""


def rank_env() -> dict:
    """Environment for fresh ranks: the project importable, no distributed settings inherited from this process."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
    )
    return env


def finish_ledger(cfg, spec: FinetuneSpec, privacy: dict, model_path: str | None = None) -> float:
    """Settle the attempt: the privacy.json *inside the model dir* (the files whose digest the ledger records) must
    describe the reserved plan, the history must be the whole plan, and then the digest is bound to the attempt.
    Returns the dataset's worst-record epsilon at the budget's delta."""
    from llmops.errors import PrivacyError
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger
    from llmops.governance.policy import load_governance

    model = Path(model_path) if model_path else Path(spec.output_dir) / "model"
    if not spec.private:
        if model.is_dir():  # never a base for a "private" run: its records were trained without any charge
            open_ledger().record_unaccounted(dir_digest(model), f"privacy.enabled=false run {spec.run_id}")
        return math.inf
    ledger = open_ledger()
    try:
        inside = json.loads((model / "privacy.json").read_text())
    except (OSError, ValueError):
        raise PrivacyError(
            "the trained model has no readable privacy.json", str(model), "re-run the flow (a new attempt is charged)"
        ) from None
    if problems := output_mismatch(ledger.entry(spec.attempt_id), inside):
        raise PrivacyError(
            f"the trained model's privacy.json does not match the reserved attempt ({'; '.join(problems[:3])})",
            str(model),
            "re-run the flow (a new attempt is charged)",
        )
    digest = dir_digest(model)
    ledger.finish(spec.attempt_id, inside["history"], model_digest=digest)
    if problems := ledger.entry(spec.attempt_id).problems:  # e.g. reproducible_insecure: never a private base
        ledger.record_unaccounted(digest, "; ".join(problems))
    return ledger.spent(spec.fingerprint, load_governance().privacy.budget_delta, spec.accountant)


def bind_artifact(attempt_id: str, name: str, path: str) -> str:
    """Record in the ledger the digest of a file tree this attempt produced that a target may publish or a server may
    serve (the edge bundle), next to the model's: what is published later must be these bytes. Returns the digest."""
    from llmops.files import dir_digest
    from llmops.governance.ledger import open_ledger

    digest = dir_digest(Path(path))
    open_ledger().bind_artifact(attempt_id, name, digest)
    return digest


def finetune(cfg, data: dict, model: dict) -> FinetuneResult:
    """Plan (ledger reservation) → launch ranks → settle the ledger. Returns paths, privacy and metrics."""
    from llmops import console

    spec, planned = plan_finetune(cfg, data, model)
    marker = Path(spec.output_dir) / PROGRESS_MARKER  # rank 0 touches it with its first step line
    marker.unlink(missing_ok=True)
    with console.phase("DP fine-tune (start ranks, load model)", quiet_when=marker.exists):
        result = launch(spec)
    marker.unlink(missing_ok=True)
    result.pop("step_seconds", None)
    result["cumulative_epsilon"] = finish_ledger(cfg, spec, result["privacy"], result["model_path"])
    result["budget"] = privacy_budget(cfg)
    result["run_id"] = spec.run_id
    result["attempt_id"] = spec.attempt_id
    return result
