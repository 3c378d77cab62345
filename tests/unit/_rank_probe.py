"""Run by test_privacy_attacks under torchrun: train a spec and write, per step, the token rows this rank trained on.

python -m torch.distributed.run --nproc_per_node 2 tests/unit/_rank_probe.py SPEC.json OUT_DIR
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import tasks.lm  # noqa: E402
from tasks.finetune import FinetuneSpec, grad_accumulation_steps, train  # noqa: E402

spec = FinetuneSpec.load(sys.argv[1])
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
rank = int(os.environ["RANK"])
gas = grad_accumulation_steps(spec)
calls: list = []
real = tasks.lm.per_sample_loss


def recording(model, input_ids, attention_mask):
    rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
    calls.append(rows)
    return real(model, input_ids, attention_mask)


tasks.lm.per_sample_loss = recording
train(spec)
steps: dict = {}
for i, rows in enumerate(calls):  # gas forward calls per step (shares of ~48 records: no empty padding chunk)
    steps.setdefault(str(i // gas), []).extend(rows)
(out / f"rank{rank}.json").write_text(json.dumps(steps))
