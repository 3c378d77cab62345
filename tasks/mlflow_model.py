"""MLflow "model from code" for a causal LM stored as an HF directory artifact (`hf_model`).

Logged by tasks/registry.py; loaded anywhere with `mlflow.pyfunc.load_model("models:/NAME@candidate")`.
Self-contained: needs only torch + transformers at load time, not this project.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class CausalLM(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["hf_model"]
        self.tok = AutoTokenizer.from_pretrained(path)
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        import torch

        max_new = int((params or {}).get("max_new_tokens", 32))
        outs = []
        for prompt in model_input:  # one at a time: no left-padding subtleties, deterministic greedy output
            ids = self.tok(prompt, return_tensors="pt")
            with torch.no_grad():
                gen = self.model.generate(
                    **ids, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.pad_token_id
                )
            outs.append(self.tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
        return outs


mlflow.models.set_model(CausalLM())
