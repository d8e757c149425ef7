"""Registered models read back: `models:/` URIs resolved, artifacts downloaded, the pyfunc loaded, sampled.

MLflow resolves a `models:/<name>@<alias>` URI with a client of the process-wide registry URI, whatever
tracking URI the caller passes; `resolve_model_uri` does it with a client of the caller's store
instead, so the gate and `flows generate` read from exactly the store they were given and never set
MLflow's global tracking or registry URI. What is downloaded is then a plain artifact location.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import warnings
from pathlib import Path

from flows.registry.pyfunc import PACK
from flows.registry.tracking import filter_literal, mlflow_client
from flows.masking import mask_uri


def _version_of(client, name: str, ref: str) -> str:
    """The version number that `ref` (a number, `latest`, or a legacy stage name) names."""
    from mlflow.exceptions import MlflowException

    if ref.isdigit():
        return ref
    if ref.lower() == "latest" and (literal := filter_literal(name)) is not None:
        versions = client.search_model_versions(f"name = {literal}")
    elif ref.lower() == "latest":  # a name the filter grammar cannot quote: the newest of each stage's newest
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; here they cover every version
            versions = client.get_latest_versions(name)
    else:  # stages are deprecated in MLflow 3, but old URIs may still name one
        versions = client.get_latest_versions(name, stages=[ref])
    if not versions:
        raise MlflowException(f"registered model {name!r} has no version {ref!r}")
    return str(max(int(v.version) for v in versions))


def resolve_model_uri(client, model_uri: str) -> str:
    """The artifact location of a models:/ URI (`name/version`, `name@alias`, `name/latest`, a logged
    model id, each with an optional sub-path), resolved through client; any other URI unchanged."""
    if not model_uri.startswith("models:"):
        return model_uri
    first, *sub = model_uri.removeprefix("models:").strip("/").split("/")
    if "@" in first:
        name, alias = first.rsplit("@", 1)
        location = client.get_model_version_download_uri(name, client.get_model_version_by_alias(name, alias).version)
    elif not sub:
        location = client.get_logged_model(first).artifact_location
    else:
        ref, *sub = sub
        location = client.get_model_version_download_uri(first, _version_of(client, first, ref))
    location = resolve_model_uri(client, location)  # a store that keeps a models:/<id> source as it is
    return "/".join([location.rstrip("/"), *sub]) if sub else location


def download_model(tracking_uri: str, model_uri: str, dst: str | Path, subpath: str = "") -> Path:
    """Download a model (or the subpath inside it) from the store at tracking_uri into dst."""
    import mlflow.artifacts

    location = resolve_model_uri(mlflow_client(tracking_uri), model_uri)
    if subpath:
        location = f"{location.rstrip('/')}/{subpath}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                    tracking_uri=tracking_uri, registry_uri=tracking_uri))


def pack_is_complete(tracking_uri: str, model_uri: str) -> bool:
    """Whether the artifact store still lists every file of the model's pack (a missing store or
    version raises: that is not the same as deleted artifacts)."""
    import mlflow.artifacts

    from flows.modelpack import CONFIG, TOKENIZER, WEIGHTS

    location = f"{resolve_model_uri(mlflow_client(tracking_uri), model_uri).rstrip('/')}/artifacts/{PACK}"
    listed = mlflow.artifacts.list_artifacts(artifact_uri=location, tracking_uri=tracking_uri)
    return {WEIGHTS, CONFIG, TOKENIZER} <= {Path(f.path).name for f in listed or []}


@contextlib.contextmanager
def user_facing_errors(tracking_uri: str, model_uri: str):
    """A store without the model (or no store at all) as one UserError naming --model-uri and the store."""
    from mlflow.exceptions import MlflowException

    from flows.errors import UserError

    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {tracking_uri}: run the pipeline first, or pass --tracking-uri")
    try:
        yield
    except MlflowException as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(mask_uri(f"--model-uri: cannot load {model_uri} from {tracking_uri}: {reason}")) from None


def download_model_pack(tracking_uri: str, model_uri: str, dst: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a registered model, read from its pyfunc's model_pack artifact only."""
    from flows.modelpack import load_model_pack

    return load_model_pack(download_model(tracking_uri, model_uri, dst, subpath=f"artifacts/{PACK}"), device=device)


def generate(model_uri: str, prompt: str, *, tracking_uri: str, max_new_tokens: int = 100,
             temperature: float = 0.8, top_k: int = 0, seed: int = 0, max_new_tokens_limit: int | None = None) -> str:
    """Load a registered model as a pyfunc (pickle-free) and return its continuation of prompt.

    The sampling settings are checked before anything is downloaded, max_new_tokens against the
    model's limit (max_new_tokens_limit, else the default for its block_size) before its weights
    load; the prompt when the model has its tokenizer. Each mistake is a UserError naming it.
    """
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from flows.errors import UserError
    from flows.modelpack import CONFIG, check_sampling, default_max_new_tokens_limit

    check_sampling(max_new_tokens, temperature, top_k, seed, limit=max_new_tokens_limit)
    with tempfile.TemporaryDirectory() as tmp:
        with user_facing_errors(tracking_uri, model_uri):
            local = download_model(tracking_uri, model_uri, tmp)
            if max_new_tokens_limit is None:  # the model's own limit, known from its config alone
                config = json.loads((local / "artifacts" / PACK / CONFIG).read_text())
                check_sampling(max_new_tokens, temperature, top_k, seed,
                               limit=default_max_new_tokens_limit(config["block_size"]))
            model_config = None if max_new_tokens_limit is None else {"max_new_tokens_limit": max_new_tokens_limit}
            model = mlflow.pyfunc.load_model(str(local), model_config=model_config)
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "seed": seed}
        try:
            return model.predict([prompt], params=params)[0]
        except MlflowException as err:
            if err.error_code != "INVALID_PARAMETER_VALUE":
                raise
            raise UserError(err.message) from None
