"""Submit the pipeline to a Ray cluster as a Ray Job: `python -m flows submit --address http://HEAD:8265`.

The job runs `python -m flows run --config-json ...` with the config validated here, once, and shipped
whole as JSON (the cluster's `run` reads it back as it is), the project directory as the runtime env's
working_dir (without .venv, workdir, .git, secrets and large files), the project's pip requirements
from pyproject.toml minus Ray itself (the cluster already runs Ray; `--no-pip` skips the install for
images that hold the project), and MLFLOW_TRACKING_URI / PREFECT_API_URL passed through. Nothing
else from this machine's environment is shipped: credentials for MLflow or S3 belong on the cluster
nodes, and the Ray token (RAY_AUTH_TOKEN) only authenticates this client's requests. The environment
is the caller's to pass (`environ`, the CLI's os.environ): this module reads none of its own.
An unreachable dashboard or a rejected token is a `UserError` (one line, exit code 2), and so is a relative
workdir or train.storage_path: the job's working directory, and all under it, is deleted when it ends.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from flows.config import PipelineConfig, load_config
from flows.errors import UserError
from flows.masking import mask_uri

PROJECT_DIR = Path(__file__).resolve().parents[1]
PASSTHROUGH_ENV = ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")
# Paths (gitignore syntax, relative to the project) never uploaded; Ray also honours .gitignore.
SKIP_DIRS = [".git", ".venv", "venv", "workdir", "mlruns", "__pycache__", ".pytest_cache", ".hypothesis",
             "build", "dist", ".ci"]
EXCLUDES = SKIP_DIRS + [
    "*.egg-info", "mlflow.db", ".env", ".env.*", "*.pem", "*.key",
    "*.pt", "*.ckpt", "*.safetensors", "*.bin", "*.npy", "*.tar", "*.tar.gz", "*.zip",
]
LARGE_FILE_BYTES = 10 * 2**20  # anything bigger is data, not code: left out of the upload
NOT_SHIPPED_REQUIREMENTS = {"ray"}  # the cluster's Ray must match its nodes; never reinstalled per job
CONNECT_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------------- what is shipped
def pip_requirements(pyproject: Path = PROJECT_DIR / "pyproject.toml") -> list[str]:
    """[project].dependencies of pyproject.toml, minus Ray (already on every node of the cluster)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if not pyproject.is_file():
        raise UserError(f"{pyproject} not found: `flows submit` runs from the project checkout")
    try:
        import tomllib
    except ImportError:  # Python 3.10: the installed project's metadata holds the same list
        from importlib.metadata import requires

        deps = [r for r in requires("attention-pipeline") or [] if "extra ==" not in r]
    else:
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(Requirement(d).name) not in NOT_SHIPPED_REQUIREMENTS]


def large_file_excludes(project_dir: Path, limit: int = LARGE_FILE_BYTES) -> list[str]:
    """Anchored excludes for files above `limit` bytes outside the directories excluded anyway."""
    found = []
    for root, dirs, files in os.walk(project_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(root) / name
            try:
                big = path.is_file() and not path.is_symlink() and path.stat().st_size > limit
            except OSError:
                continue
            if big:
                found.append("/" + path.relative_to(project_dir).as_posix())
    return found


def build_runtime_env(project_dir: Path = PROJECT_DIR, *, pip: bool = True,
                      environ: Mapping[str, str]) -> dict[str, Any]:
    """The job's runtime_env: working_dir + excludes, pip requirements (optional), passed-through env."""
    env_vars = {k: environ[k] for k in PASSTHROUGH_ENV if environ.get(k)}
    env_vars["PYTHONUNBUFFERED"] = "1"  # stream the driver's prints as they happen
    runtime_env: dict[str, Any] = {
        "working_dir": str(project_dir),
        "excludes": EXCLUDES + large_file_excludes(project_dir),
        "env_vars": env_vars,
    }
    if pip:
        runtime_env["pip"] = {"packages": pip_requirements(project_dir / "pyproject.toml"), "pip_check": False}
        runtime_env["config"] = {"setup_timeout_seconds": 1800}  # a first torch install takes minutes
    return runtime_env


def build_entrypoint(config: str | None, overrides: Iterable[str], *, config_json: str | None = None) -> str:
    """`python -m flows run --config-json <the validated config>`: validated here, before any upload, so a
    bad key or value fails on this machine, naming it; the cluster parses the JSON once and re-encodes nothing.
    Keys left unset (registry.tracking_uri, train.ray_address) stay unset, for the job's environment to fill."""
    return entrypoint_for(load_config(config, list(overrides), json_text=config_json))


def entrypoint_for(cfg: PipelineConfig) -> str:
    payload = json.dumps(cfg.model_dump(mode="json"), separators=(",", ":"))
    return shlex.join(["python", "-m", "flows", "run", "--config-json", payload])


_JOB_DIR = ("a Ray Job runs in a temporary working directory that the cluster deletes when the job ends, "
            "and a relative path would put {what} there")
_WHERE = ("pass an absolute path on storage every node shares (--set workdir=/shared/attention) or an object-store "
          "train.storage_path (--set train.storage_path=s3://bucket/prefix)")


def check_job_paths(cfg: PipelineConfig, environ: Mapping[str, str]) -> None:
    """Refuse relative paths whose contents would die with the job's working directory: train.storage_path
    (checkpoints, staged data); workdir (prepared data, and checkpoints and the MLflow store unless they
    live elsewhere) unless train.storage_path is an object store and the registry a tracking server."""
    storage = cfg.train.storage_path
    if storage is not None and "://" not in storage and not Path(storage).expanduser().is_absolute():
        raise UserError(f"train.storage_path: {storage!r} is relative: {_JOB_DIR.format(what='the checkpoints')}; "
                        "pass an absolute path on storage every node shares, or an object-store URI "
                        "(s3://bucket/prefix)")
    if Path(cfg.workdir).expanduser().is_absolute():
        return
    object_store = storage is not None and "://" in storage and not storage.startswith("file://")
    tracking = cfg.registry.tracking_uri or environ.get("MLFLOW_TRACKING_URI")
    if object_store and tracking:
        return  # only the prepared data, re-made (or staged) by each run, lives under the job's directory
    if object_store:
        raise UserError(f"workdir: {cfg.workdir!r} is relative and would hold the MLflow store (no "
                        f"registry.tracking_uri or MLFLOW_TRACKING_URI): {_JOB_DIR.format(what='it')}; pass an "
                        "absolute workdir on shared storage, or set MLFLOW_TRACKING_URI to a tracking server")
    what = "the prepared data, the checkpoints and the MLflow store"
    raise UserError(f"workdir: {cfg.workdir!r} is relative: {_JOB_DIR.format(what=what)}; {_WHERE}")


# --------------------------------------------------------------------------------- the cluster
def _auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """Bearer header from RAY_AUTH_TOKEN or the file named by RAY_AUTH_TOKEN_PATH (Ray token auth).
    Without either, Ray's client adds ~/.ray/auth_token itself when RAY_AUTH_MODE=token."""
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    path = environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise UserError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token ({err.strerror})") from None
    return {"Authorization": f"Bearer {token}"} if token else {}


def normalize_address(address: str | None) -> str:
    """http(s)://host:port of the Ray dashboard (Jobs API); a bare host:port gets http://."""
    address = (address or "").strip().rstrip("/")
    if not address:
        raise UserError("--address (or RAY_API_SERVER_ADDRESS) is required: the Ray dashboard, "
                        "e.g. http://HEAD:8265")
    if address.startswith("ray://"):
        raise UserError(f"--address {address}: give the dashboard (Jobs API) address, e.g. http://HEAD:8265, "
                        "not a Ray Client address")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: expected http://HOST:8265 or https://HOST")
    return address


def _auth_error(address: str, status: int) -> UserError:
    if status == 401:
        return UserError(f"the Ray cluster at {address} requires a token (Ray token authentication): "
                         "set RAY_AUTH_TOKEN to the cluster's token")
    return UserError(f"the Ray cluster at {address} rejected the token (HTTP 403): "
                     "RAY_AUTH_TOKEN does not match the cluster's token")


def check_cluster(address: str, headers: dict[str, str], timeout: float = CONNECT_TIMEOUT_S) -> str:
    """GET /api/version with a timeout; returns the cluster's Ray version or raises UserError."""
    import requests

    url = f"{address}/api/version"
    try:
        r = requests.get(url, headers=headers, timeout=timeout)
    except requests.exceptions.SSLError as err:
        raise UserError(f"TLS error talking to {address}: {str(err).splitlines()[0][:200]}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout):
        raise UserError(f"cannot reach the Ray dashboard at {address}: is the cluster up and its dashboard "
                        "port (8265) reachable from here?") from None
    if r.status_code in (401, 403):
        raise _auth_error(address, r.status_code)
    try:
        version = r.json()["ray_version"] if r.ok else None
    except (ValueError, KeyError, TypeError):
        version = None
    if not version:
        raise UserError(f"{address} does not answer as a Ray dashboard with the Jobs API "
                        f"(GET /api/version: HTTP {r.status_code}); the cluster needs ray[default]")
    return version


def connect(address: str, environ: Mapping[str, str]):
    """A JobSubmissionClient for a reachable, authorised cluster at a normalized address (else UserError)."""
    headers = _auth_headers(environ)
    check_cluster(address, headers)  # before importing Ray: a wrong address fails in milliseconds
    from ray.job_submission import JobSubmissionClient

    with _as_user_errors(address):
        return JobSubmissionClient(address, headers=headers or None)


@contextmanager
def _as_user_errors(address: str):
    """Turns the client's connection and authentication failures into one-line UserErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        raise _auth_error(address, 403 if "failed" in str(err).lower() else 401) from None
    except (ConnectionError, requests.exceptions.ConnectionError):
        raise UserError(f"lost the connection to the Ray dashboard at {address}") from None


# --------------------------------------------------------------------------------- submit
def new_submission_id() -> str:
    return f"attention-pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


async def _stream_logs(client, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_job(client, job_id: str, out: TextIO, poll_s: float = 2.0):
    """Stream the job's logs until it ends; returns its final JobStatus."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except Exception as err:  # noqa: BLE001 - a dropped log stream must not lose the job's outcome
        print(f"[submit] log stream ended early ({type(err).__name__}); waiting for the job to finish",
              file=sys.stderr)
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(poll_s)
    return status


def submit_pipeline(address: str | None, *, config: str | None = None, config_json: str | None = None,
                    overrides: Iterable[str] = (), wait: bool = True, pip: bool = True,
                    project_dir: Path = PROJECT_DIR, out: TextIO | None = None,
                    environ: Mapping[str, str] | None = None) -> int:
    """Submit `python -m flows run` as a Ray Job; with `wait`, stream its logs and return 0 on SUCCEEDED.
    environ: the caller's environment (the CLI passes os.environ; None: an empty one)."""
    out = out or sys.stdout
    environ = {} if environ is None else environ
    cfg = load_config(config, list(overrides), json_text=config_json)
    check_job_paths(cfg, environ)  # before anything is uploaded
    entrypoint = entrypoint_for(cfg)
    runtime_env = build_runtime_env(project_dir, pip=pip, environ=environ)
    address = normalize_address(address)
    client = connect(address, environ)
    with _as_user_errors(address):
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   submission_id=new_submission_id(),
                                   metadata={"project": "attention-pipeline"})
        print(mask_uri(f"[submit] job {job_id} submitted to {address}: {entrypoint}"), file=out, flush=True)
        if not wait:
            print(f"[submit] follow it with: ray job logs --follow --address {address} {job_id}", file=out)
            return 0
        try:
            status = wait_for_job(client, job_id, out)
        except KeyboardInterrupt:
            print(f"\n[submit] detached; job {job_id} keeps running. "
                  f"Stop it with: ray job stop --address {address} {job_id}", file=sys.stderr)
            return 130
    info = client.get_job_info(job_id)
    # The message repeats the job's last logs, already streamed above: its first line is enough.
    detail = f": {info.message.splitlines()[0]}" if info.message and str(status) != "SUCCEEDED" else ""
    print(f"[submit] job {job_id} {status}{detail}", file=out, flush=True)
    return 0 if str(status) == "SUCCEEDED" else 1
