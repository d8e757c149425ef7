"""The MLflow pyfunc of a model pack, saved as "models from code": no pickle anywhere.

`_pyfunc_entry.py` (beside this file) is the file MLflow stores and executes at load time; it only
instantiates `AttentionLM` below, so a model loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false in
any process where the project is installed. predict() takes prompt strings and returns the generated
continuations; the sampling settings are pyfunc params (see `signature`). A request is checked
before anything is generated (flows/modelpack.py `generate_text`): at most `max_new_tokens_limit` new
tokens and prompt tokens, by default the larger of the model's block_size and 1024, or what the
loader's model_config says (`mlflow.pyfunc.load_model(uri, model_config={"max_new_tokens_limit": N})`).
A bad parameter or
prompt raises MlflowException(INVALID_PARAMETER_VALUE), which `mlflow models serve` answers with a 400
and the message, and keeps serving. `save_pyfunc` writes the MLflow model directory locally; logging
and registering it is flows/registry/versions.py's job.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from flows.errors import UserError
from flows.modelpack import check_limit, default_max_new_tokens_limit, generate_text, load_model_pack

ENTRY = str(Path(__file__).with_name("_pyfunc_entry.py"))
PACK = "model_pack"  # the artifact key, and the folder under <model>/artifacts/ that holds the pack
# top_k 0 means no top-k cut; one seed makes predict() repeatable (each prompt i samples with seed + i)
DEFAULT_PARAMS = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 0, "seed": 0}

log = logging.getLogger(__name__)


class AttentionLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.model, self.tokenizer = load_model_pack(context.artifacts[PACK])
        self.max_new_tokens_limit = max_new_tokens_limit(self.model.config.block_size, context.model_config)

    # The DataFrame hint is what pyfunc passes for the string-column signature; MLflow infers no
    # second schema from it (the explicit `signature()` stays the contract).
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> list[str]:
        p = {**DEFAULT_PARAMS, **(params or {})}
        try:
            return generate_text(self.model, self.tokenizer, _prompts(model_input),
                                 max_new_tokens=p["max_new_tokens"], temperature=p["temperature"],
                                 top_k=p["top_k"], seed=p["seed"], max_new_tokens_limit=self.max_new_tokens_limit)
        except UserError as err:  # the caller's mistake: a 400 with the message, not a failed server
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


def max_new_tokens_limit(block_size: int, model_config: dict | None) -> int:
    """model_config's max_new_tokens_limit when it sets one, else the default for block_size."""
    limit = (model_config or {}).get("max_new_tokens_limit")
    if limit is None:
        return default_max_new_tokens_limit(block_size)
    try:
        return check_limit(limit)
    except UserError as err:  # the server's configuration: loading fails, naming it
        raise MlflowException(f"model_config: {err}", error_code=INVALID_PARAMETER_VALUE) from None


def _prompts(model_input) -> list:
    """The prompts of a DataFrame (its `prompt` column, else its first), a string or a list, unconverted:
    generate_text says which one is not a string."""
    if hasattr(model_input, "columns"):  # pandas DataFrame, as pyfunc passes signature-typed input
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return model_input[column].tolist()
    if isinstance(model_input, str):
        return [model_input]
    return list(model_input)


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


def save_pyfunc(pack_dir: str | Path, path: str | Path, example_prompt: str, *, mlflow_model=None) -> Path:
    """Write the pack as an MLflow pyfunc model directory at path (which must not exist yet).

    mlflow_model is the `mlflow.models.Model` whose metadata (model id, run id) the MLmodel file
    records, as log_model would write it. The input example is a prompt the evaluation has already
    sampled from (so it is inside the tokenizer's vocabulary) with a short generation; the saved model
    is loaded back and runs it once, as MLflow's log_model does: a failure is a warning, not a lost model.
    """
    example = ([example_prompt], {"max_new_tokens": 4})
    mlflow.pyfunc.save_model(
        path=str(path), python_model=ENTRY, artifacts={PACK: str(pack_dir)}, signature=signature(),
        input_example=example, pip_requirements=pip_requirements(), mlflow_model=mlflow_model,
    )
    try:
        mlflow.pyfunc.load_model(str(path)).predict(example[0], params=example[1])
    except Exception as err:  # noqa: BLE001 - as log_model: worth a warning, not a lost model
        log.warning("the saved model failed to run its input example: %s", err)
    for pycache in Path(path).rglob("__pycache__"):  # loading executed the entry file inside path
        shutil.rmtree(pycache, ignore_errors=True)
    return Path(path)
