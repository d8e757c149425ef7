"""The MLflow pyfunc wrapper of a model pack (logged as "models from code": no pickle anywhere).

`flows/_pyfunc_entry.py` is the file MLflow stores and executes at load time; it only instantiates
`AttentionLM` below. predict() takes prompt strings and returns generated strings.
"""

from __future__ import annotations

import mlflow.pyfunc

from flows.modelpack import generate_text, load_model_pack

DEFAULT_PARAMS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "seed": 0}


class AttentionLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.tokenizer = load_model_pack(context.artifacts["model_pack"])

    def predict(self, context, model_input, params=None):
        prompts = _prompts(model_input)
        p = {**DEFAULT_PARAMS, **(params or {})}
        return generate_text(self.model, self.tokenizer, prompts, max_new_tokens=int(p["max_new_tokens"]),
                             temperature=float(p["temperature"]), top_k=int(p["top_k"]) or None,
                             seed=int(p["seed"]))


def _prompts(model_input) -> list[str]:
    if hasattr(model_input, "columns"):  # pandas DataFrame, as pyfunc passes signature-typed input
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(v) for v in model_input[column].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(v) for v in model_input]
