"""The compress step as a Prefect task publishes its table artifact (the techniques themselves: tests/unit/test_compression.py)."""

from __future__ import annotations

import json

from tests.unit.test_compression import Cfg  # noqa: F401


def test_compress_task_publishes_a_table_artifact(prefect_harness, monkeypatch, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from flows import steps

    fake = {
        "variants": [{"name": "x"}],
        "rows": [{"variant": "x", "gate": "PASS"}],
        "table_md": "|x|",
        "selected": "x",
        "baseline": {},
        "edge": None,
    }
    monkeypatch.setattr(steps, "compress", lambda *a, **k: fake)

    @flow
    def f():
        return steps.compress_task.with_options(cache_policy=None)("m", str(tmp_path), Cfg(), "e", 32, None)

    assert f()["selected"] == "x"

    async def latest():
        async with get_client() as client:
            return await client.read_latest_artifacts()

    import asyncio

    arts = [a for a in asyncio.run(latest()) if a.key == "compression"]
    assert arts and "gate" in json.dumps(arts[0].data)
