"""Text as the privacy rules see it: a record's identity (`identity`), its near-variants (`neardup`), and the PII/PHI
detectors (`pii`). Pure Python: no torch, no servers; the pipeline steps in `tasks/` and the ledger both use them."""
