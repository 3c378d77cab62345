"""Distillation into a shallower student initialised from evenly spaced teacher layers, trained on the teacher's
logits (temperature-scaled KL + CE). It reads text, so that text must be public: `check_public` refuses any record
that is private (this run's splits or the privacy ledger) before any work."""

from __future__ import annotations

import re
from pathlib import Path

from tasks.compression.common import CompressionError, decoder_layers, log, rebuild, save_hf


def check_public(data_path: str | Path | None, private_paths: list[str] | None) -> str:
    """Fingerprint of the distillation text; PrivacyError if any of its records is private.

    Record-level, by normalised identity: against this run's train/held-out splits (`private_paths`) and every
    record the deployment's privacy ledger has charged. Whole-dataset fingerprints would accept the private set
    plus one extra line, or a re-ordered, re-spaced copy of it.
    """
    from llmops.errors import PrivacyError
    from tasks.data import load_dataset
    from tasks.privacy import count_private

    if data_path is None:
        raise PrivacyError(
            "distillation needs text and none was declared public",
            "compression.distill_data",
            "set compression.distill_data to public text (e.g. data/public/macbeth.txt)",
        )
    ds = load_dataset(Path(data_path))
    if overlap := count_private([r.text for r in ds.records], private_paths or []):
        raise PrivacyError(
            f"{overlap} of {len(ds.records)} distillation record(s) are in the private training set or the privacy "
            "ledger; reading them again would spend privacy budget the ledger has not granted",
            "compression.distill_data",
            "point compression.distill_data at public text (e.g. data/public/macbeth.txt), or disable distillation",
        )
    if not private_paths:
        log.warning("no private splits given: %s checked against the privacy ledger only", data_path)
    return ds.fingerprint


def student_layer_ids(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced teacher blocks, always keeping the first and the last."""
    if not 1 <= n_student <= n_teacher:
        raise CompressionError(
            f"student_layers={n_student} must be between 1 and the teacher's {n_teacher}",
            "compression.student_layers",
            "pick a smaller student depth",
        )
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def make_student(teacher, n_layers: int):
    import copy

    prefix, layers = decoder_layers(teacher)
    ids = student_layer_ids(len(layers), n_layers)
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = n_layers
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in ids]
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    sd = {}
    for k, v in teacher.state_dict().items():
        m = pat.match(k)
        if m is None:
            sd[k] = v.clone()
        elif int(m.group(1)) in ids:
            sd[pat.sub(f"{prefix}.{ids.index(int(m.group(1)))}.", k)] = v.clone()
    return rebuild(cfg, sd), ids


def distill_loss(s_logits, t_logits, input_ids, attention_mask, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels), over unpadded next-token positions."""
    import torch.nn.functional as F

    mask = attention_mask[:, 1:].bool()
    s, t = s_logits[:, :-1][mask].float(), t_logits[:, :-1][mask].float()
    kl = (
        F.kl_div(
            F.log_softmax(s / temperature, -1),
            F.log_softmax(t / temperature, -1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    ce = F.cross_entropy(s, input_ids[:, 1:][mask])
    return alpha * kl + (1 - alpha) * ce, kl.item(), ce.item()


def build_distilled(teacher, tok, out: Path, data_path: Path, max_len: int, cfg) -> dict:
    import random

    import torch
    from tqdm.auto import tqdm

    from tasks.data import load_dataset
    from tasks.lm import encode

    n_teacher = len(decoder_layers(teacher)[1])
    n_student = cfg.student_layers or max(1, n_teacher // 2)
    steps, bs = cfg.distill_steps, cfg.distill_batch_size
    temp, alpha = cfg.distill_temperature, cfg.distill_alpha
    torch.manual_seed(cfg.distill_seed)
    student, ids = make_student(teacher, n_student)
    texts = [r.text for r in load_dataset(data_path).records]
    rng = random.Random(cfg.distill_seed)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_learning_rate, weight_decay=0.0)
    teacher.eval()
    student.train()
    order: list[str] = []
    last = {}
    for step in tqdm(range(steps), desc="distill", unit="step", dynamic_ncols=True):
        if len(order) < bs:
            order += rng.sample(texts, len(texts))
        batch, order = encode(tok, order[:bs], max_len), order[bs:]
        with torch.no_grad():
            t_logits = teacher(**batch).logits
        loss, kl, ce = distill_loss(
            student(**batch).logits, t_logits, batch["input_ids"], batch["attention_mask"], temp, alpha
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        last = {"step": step + 1, "loss": round(loss.item(), 4), "kl": round(kl, 4), "ce": round(ce, 4)}
    student.eval()
    save_hf(
        student,
        tok,
        out,
        technique="distill",
        teacher_layers=n_teacher,
        student_layers=n_student,
        layer_ids=ids,
        distill_data=str(data_path),
        steps=steps,
        final=last,
    )
    return {"student_layers": n_student, "teacher_layers": n_teacher, "distill_final": last}
