"""The MLflow pyfunc of a model pack, logged as "models from code": no pickle anywhere.

`flows/_pyfunc_entry.py` is the file MLflow stores and executes at load time; it only instantiates
`AttentionLM` below, so a model loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false in any process
where the project is installed. predict() takes prompt strings and returns the generated continuations;
the sampling settings are pyfunc params (see `signature`). `log_pyfunc` logs one to the active run.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from flows.modelpack import generate_text, load_model_pack

ENTRY = str(Path(__file__).with_name("_pyfunc_entry.py"))
PACK = "model_pack"  # the artifact key, and the folder under <model>/artifacts/ that holds the pack
# top_k 0 means no top-k cut; one seed makes predict() repeatable (each prompt i samples with seed + i)
DEFAULT_PARAMS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "seed": 0}


class AttentionLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.tokenizer = load_model_pack(context.artifacts[PACK])

    # The DataFrame hint is what pyfunc passes for the string-column signature; MLflow infers no
    # second schema from it (the explicit `signature()` stays the contract).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
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


def signature():
    """A list of prompt strings in, one generated string per prompt out; sampling settings as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", DEFAULT_PARAMS["max_new_tokens"]),
                            ParamSpec("temperature", "double", DEFAULT_PARAMS["temperature"]),
                            ParamSpec("top_k", "long", DEFAULT_PARAMS["top_k"]),
                            ParamSpec("seed", "long", DEFAULT_PARAMS["seed"])]),
    )


def pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "safetensors", "tokenizers", "mlflow", "numpy")]


def log_pyfunc(pack_dir: str | Path, example_prompt: str):
    """Log the pack as pyfunc `model` to the active MLflow run; returns MLflow's ModelInfo.

    The input example is a prompt the evaluation has already sampled from (so it is inside the
    tokenizer's vocabulary) with a short generation, which MLflow runs once to validate the model.
    """
    return mlflow.pyfunc.log_model(
        name="model", python_model=ENTRY, artifacts={PACK: str(pack_dir)}, signature=signature(),
        input_example=([example_prompt], {"max_new_tokens": 4}), pip_requirements=pip_requirements(),
    )


def generate(model_uri: str, prompt: str, *, tracking_uri: str, max_new_tokens: int = 100,
             temperature: float = 0.8, top_k: int = 0, seed: int = 0) -> str:
    """Load a registered model as a pyfunc (pickle-free) and return its continuation of prompt."""
    from mlflow.exceptions import MlflowException

    from flows.errors import UserError

    if max_new_tokens < 1 or temperature < 0 or top_k < 0:
        raise UserError(f"generate: need max_new_tokens >= 1, temperature >= 0, top_k >= 0; got "
                        f"{max_new_tokens}, {temperature}, {top_k}")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {tracking_uri}: run the pipeline first, or pass --tracking-uri")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--model-uri: cannot load {model_uri} from {tracking_uri}: {reason}") from None
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
    return model.predict([prompt], params=params)[0]
