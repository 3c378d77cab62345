"""The privacy ledger under concurrent reserves on the team PostgreSQL (the other attacks: tests/unit/test_privacy_attacks.py)."""

from __future__ import annotations

import pytest

from llmops.errors import PrivacyError
from llmops.governance.accounting import epsilon_of, noise_for_target
from tests.unit.test_privacy_attacks import _pg_reserve  # noqa: F401


@pytest.mark.integration
@pytest.mark.parametrize("n,fit", [(5, 2)])
def test_concurrent_reserves_on_the_team_postgres_ledger(postgres_url, n, fit):
    """The same race against the team ledger (governance `privacy.ledger: postgresql://...`), from separate
    processes as separate training workers would: exactly the reservations that fit pass."""
    import multiprocessing
    import uuid

    from llmops.governance.ledger import PostgresLedger, open_ledger

    delta, q, steps = 1e-5, 0.02, 200
    run = [[noise_for_target(3.0, delta, q, steps), q, steps]]
    budget = (epsilon_of(run * fit, delta, "prv") + epsilon_of(run * (fit + 1), delta, "prv")) / 2
    fp = f"fp-{uuid.uuid4().hex[:8]}"
    assert isinstance(open_ledger(postgres_url), PostgresLedger)
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        results = pool.map(_pg_reserve, [(postgres_url, f"{fp}-a{i}", fp, run, delta, budget) for i in range(n)])
    recs = sorted(f"{fp}-{r}" for r in "abc")  # records are global: fresh ones per test (the server is shared)
    assert sorted(results).count(True) == fit and results.count(False) == n - fit
    ledger = open_ledger(postgres_url)
    assert ledger.spent(fp, delta) <= budget and len(ledger.entries(fp)) == fit
    assert sorted(ledger.records(fp)) == recs
    assert ledger.known([recs[0], "never-trained-on"]) == 1
    # a second dataset sharing one record is charged for what that record already spent (record-level)
    with pytest.raises(PrivacyError, match="already spent"):
        ledger.reserve(f"{fp}-other", f"{fp}-other", run, delta, "prv", budget, records=[recs[0], "new"])
