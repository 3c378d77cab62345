"""DP fine-tuning benchmarks on the real SmolLM2-135M-Instruct (CPU here; any GPU the same way).

    .venv/bin/python bench/bench_dp.py                 # both tables (~25 min on 2 CPU cores)
    .venv/bin/python bench/bench_dp.py --only speed    # step-time ratios only (~6 min; --methods lora: ~3)
    .venv/bin/python bench/bench_dp.py --only quality --steps 40

Table 1: seconds per optimizer step, DP vs non-private, same model, same batches, measured side by side
(interleaved steps of each mode), for LoRA and full fine-tuning.
Table 2: held-out loss after training with DP (epsilon=8) vs non-private, same steps/lr, Poisson batches (CSPRNG).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def base_spec(state: Path, steps: int, batch: int, max_len: int):
    from tasks.data import prepare_data
    from tasks.finetune import FinetuneSpec
    from tasks.model import resolve_model

    data = prepare_data(ROOT / "data/sample/shakespeare.jsonl", state, 0.1)
    model = resolve_model("smollm2", state)
    return data, FinetuneSpec(
        run_id="bench",
        model_path=model.path,
        train_path=data.train_path,
        output_dir="",
        fingerprint=data.fingerprint,
        n_train=data.n_train,
        max_len=max_len,
        batch_size=batch,
        micro_batch_size=batch // 2,
        steps=steps,
        sample_rate=batch / data.n_train,
        sampling="poisson",
        learning_rate=2e-3,
        noise_multiplier=1.0,
        deepspeed_config=str(ROOT / "infra/deepspeed/zero0.json"),
        checkpoint_every=10**9,
        delta=1e-4,
    )


def run(spec, out: Path, **kw) -> dict:
    from tasks.finetune import train

    s = replace(spec, output_dir=str(out), **kw)
    out.mkdir(parents=True, exist_ok=True)
    return train(s)


def speed(spec, tmp: Path, rounds: int, methods: list[str]) -> list[tuple]:
    """Both arms on the same seeded Poisson batches (reproducible_insecure: a timing run, never a model to release),
    so per-step times compare like with like; the CSPRNG draw a private run adds is timed by `sampling_cost`."""
    rows = []
    for method, lr in (("lora", 2e-3), ("full", 5e-5)):
        if method not in methods:
            continue
        times = {"dp": [], "plain": []}
        for r in range(rounds):  # interleave the two modes so machine noise hits both alike
            for mode in ("dp", "plain"):
                res = run(
                    spec,
                    tmp / f"{method}-{mode}-{r}",
                    method=method,
                    learning_rate=lr,
                    steps=3,
                    private=mode == "dp",
                    reproducible_insecure=True,
                )
                times[mode] += res["step_seconds"][1:]  # first step warms up; in memory only, never logged
        dp, plain = statistics.median(times["dp"]), statistics.median(times["plain"])
        print(f"  {method}: per-step seconds dp={times['dp']} plain={times['plain']}", flush=True)
        rows.append((method, spec.batch_size, spec.max_len, plain, dp, dp / plain))
    return rows


def sampling_cost(sizes=(1_294, 20_000, 1_000_000), q: float = 0.01, rounds: int = 20) -> list[tuple]:
    """Seconds per CSPRNG Poisson draw (os.urandom, 64 bits per record) for a few dataset sizes."""
    import time

    from tasks.privacy import poisson_sample

    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        for _ in range(rounds):
            poisson_sample(n, q)
        rows.append((n, (time.perf_counter() - t0) / rounds))
    return rows


def quality(spec, data, tmp: Path, steps: int, epsilon: float, dp_lrs: list[float] | None = None) -> list[tuple]:
    from llmops.governance.accounting import noise_for_target
    from tasks.evaluation import heldout_loss

    sigma = noise_for_target(epsilon, spec.delta, spec.sample_rate, steps, "prv")
    base = heldout_loss(spec.model_path, data.eval_path, max_records=10**9, max_len=spec.max_len)
    rows = [("base model (no training)", "-", base["eval_loss"], base["eval_tokens"])]
    runs = [("non-private", {"private": False})]
    runs += [
        (f"DP eps={epsilon:g}" + (f" lr={lr:g}" if dp_lrs else ""), {"noise_multiplier": sigma, "learning_rate": lr})
        for lr in (dp_lrs or [spec.learning_rate])
    ]
    for name, kw in runs:
        res = run(spec, tmp / name.replace(" ", "_"), steps=steps, **kw)
        ev = heldout_loss(res["model_path"], data.eval_path, max_records=10**9, max_len=spec.max_len)
        eps = res["privacy"]["epsilon"]
        rows.append((name, f"{eps:.2f}" if eps is not None else "inf", ev["eval_loss"], ev["eval_tokens"]))
    return rows, sigma


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["speed", "quality"])
    ap.add_argument("--steps", type=int, default=40, help="training steps for the quality table")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (non-private, and DP unless --dp-lr)")
    ap.add_argument("--dp-lr", type=float, nargs="*", help="DP learning rates to try (each a row)")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--methods", nargs="*", default=["lora", "full"], choices=["lora", "full"])
    args = ap.parse_args()
    state = ROOT / ".llmops"
    data, spec = base_spec(state, args.steps, args.batch, args.max_len)
    spec = replace(spec, learning_rate=args.lr, lora_r=args.lora_r, lora_alpha=2 * args.lora_r)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "speed"):
            print("\nTable 1: seconds per optimizer step (median), SmolLM2-135M, CPU, DeepSpeed ZeRO-0, 1 rank")
            print(f"{'method':<8}{'batch':>6}{'seq':>5}{'non-private s':>15}{'DP s':>9}{'DP/plain':>10}")
            for m, b, t, p, d, r in speed(spec, tmp, args.rounds, args.methods):
                print(f"{m:<8}{b:>6}{t:>5}{p:>15.2f}{d:>9.2f}{r:>10.3f}")
            print("CSPRNG Poisson sample per step (added to every private step, not in the rows above):")
            for n, sec in sampling_cost():
                print(f"  n={n:>9,}: {sec * 1000:.2f} ms")
        if args.only in (None, "quality"):
            rows, sigma = quality(spec, data, tmp, args.steps, 8.0, args.dp_lr)
            print(
                f"\nTable 2: held-out loss on {data.n_eval} held-out Shakespeare records after {args.steps} LoRA "
                f"(r={args.lora_r}) steps (batch {args.batch}, q={spec.sample_rate:.4f}, sigma={sigma:.3f}, C=1, "
                f"delta={spec.delta:g}, lr={args.lr:g})"
            )
            print(f"{'run':<26}{'epsilon':>9}{'eval loss':>11}{'tokens':>8}")
            for name, eps, loss, toks in rows:
                print(f"{name:<26}{eps:>9}{loss:>11.4f}{toks:>8}")
            for row in rows[2:]:
                print(f"{row[0]} - non-private gap: {row[2] - rows[1][2]:+.4f} nats")


if __name__ == "__main__":
    main()
