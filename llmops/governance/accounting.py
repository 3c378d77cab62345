"""Privacy accounting: the epsilon of a composed DP-SGD history, the noise for a target epsilon, and the one rule for
when an (epsilon, delta) is a guarantee at all (`guarantee_problems`).

Opacus' accountants (PRV by default, RDP as its fallback and upper bound) do the math; they are imported only when an
epsilon is computed, so reading the ledger or checking evidence never loads torch.
"""

from __future__ import annotations

import math

# ----------------------------------------------------------------------------------------------- accounting


def make_accountant(kind: str, history: list | None = None):
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = PRVAccountant() if kind == "prv" else RDPAccountant()
    acc.history = [tuple(h) for h in (history or [])]
    return acc


def epsilon_of(history: list, delta: float, kind: str = "prv") -> float:
    """epsilon of a composed history [(sigma, q, steps), ...] at delta (0 for no private steps)."""
    history = [h for h in history if h[2] > 0]
    if not history:
        return 0.0
    if any(h[0] == 0 for h in history):
        return math.inf
    acc = make_accountant(kind, history)
    return float(acc.get_epsilon(delta=delta)) if kind == "rdp" else _prv_epsilon(acc, delta)


def _prv_epsilon(acc, delta: float) -> float:
    try:
        return float(acc.get_epsilon(delta=delta))
    except (ValueError, RuntimeError):
        # PRV's discretisation fails far outside its domain (tiny sigma, huge eps): RDP is a valid upper bound.
        return float(make_accountant("rdp", acc.history).get_epsilon(delta=delta))


def noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str = "prv") -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=kind,
            epsilon_tolerance=0.01,
        )
    )


def guarantee_problems(privacy: dict) -> list[str]:
    """Why a run's (epsilon, delta) is *not* a differential-privacy guarantee (empty = it is). Pure; the trainer,
    the gate and the registry all ask this one function."""
    problems = []
    if not privacy.get("dp_sgd", privacy.get("private")):
        problems.append("trained without DP-SGD (privacy.enabled=false)")
        return problems
    if not privacy.get("noise_multiplier"):
        problems.append("noise_multiplier is 0: no noise, no privacy")
    eps = privacy.get("epsilon")
    if eps is None or not math.isfinite(float(eps)):
        problems.append("epsilon is infinite")
    if privacy.get("sampling", "poisson") != "poisson":
        problems.append(f"sampling '{privacy.get('sampling')}' is not the Poisson sampling the accountant assumes")
    if privacy.get("reproducible_insecure"):
        problems.append("reproducible_insecure: batches and noise follow a known seed, so epsilon does not hold")
    return problems
