"""flows/submit.py without a cluster: the entrypoint, the runtime_env, and the errors a user can cause.

The runtime_env is checked with Ray's own code (RuntimeEnv validation, and the packaging that zips
working_dir for upload); an unreachable dashboard is a real closed port. A real cluster, with token
rejection and a full run, is tests/integration/test_submit_cluster.py.
"""

from __future__ import annotations

import shlex
import socket
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from flows.__main__ import build_parser, main
from flows.config import load_config
from flows.errors import UserError
from flows.submit import (
    EXCLUDES,
    PROJECT_DIR,
    PASSTHROUGH_ENV,
    _auth_headers,
    build_entrypoint,
    build_runtime_env,
    check_cluster,
    check_job_paths,
    large_file_excludes,
    normalize_address,
    pip_requirements,
    submit_pipeline,
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _reparse(entrypoint: str):
    """The config the job will run with: parse the entrypoint as the cluster's shell and CLI do."""
    argv = shlex.split(entrypoint)
    assert argv[:4] == ["python", "-m", "flows", "run"]
    args = build_parser().parse_args(argv[3:])
    return load_config(args.config, args.overrides, json_text=args.config_json)


# ------------------------------------------------------------------------------------ entrypoint
@pytest.mark.parametrize("overrides", [[], ["train.lr=3e-3", "model.dropout=0.1"], ["eval.prompts=[a, 'b c']"]])
def test_entrypoint_reproduces_file_and_overrides(tmp_path: Path, overrides):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "workdir": "/shared/work dir",
        "model": {"n_layer": 2, "n_embd": 64, "n_head": 2},
        "train": {"lr": 1e-5, "min_lr": 1e-6, "use_gpu": True, "ray_address": None},
        "eval": {"prompts": ["def ", "class Request:\n", "héllo 'quoted' \"both\""], "top_k": None},
    }))
    entrypoint = build_entrypoint(str(config), overrides)
    assert _reparse(entrypoint) == load_config(config, overrides)
    assert str(config) not in entrypoint  # the file's content travels, not its local path


def test_entrypoint_ships_the_validated_config_once_as_json():
    entrypoint = build_entrypoint(None, ["train.num_workers=2", "data.source=/data/corpus*.txt",
                                         "train.run_name=2024"])
    argv = shlex.split(entrypoint)
    assert argv[:5] == ["python", "-m", "flows", "run", "--config-json"] and len(argv) == 6  # nothing re-encoded
    cfg = _reparse(entrypoint)
    assert (cfg.train.num_workers, cfg.data.source, cfg.train.run_name) == (2, "/data/corpus*.txt", "2024")
    # what the job's environment fills stays unset in what is shipped
    assert cfg.registry.tracking_uri is None and cfg.train.ray_address is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.nope=1"], "unknown config key 'train.nope'"),
    (["train.lr=-1"], "train.lr"),
])
def test_invalid_config_fails_before_contacting_the_cluster(overrides, message):
    with pytest.raises(UserError, match=message):
        submit_pipeline(f"http://127.0.0.1:{_closed_port()}", overrides=overrides)


# ------------------------------------------------------------------------------------ paths the job outlives
@pytest.mark.parametrize(("overrides", "environ", "needles"), [
    ([], {}, ["workdir: 'workdir' is relative", "absolute path on storage every node shares",
              "object-store train.storage_path"]),
    (["workdir=runs/nightly", "train.storage_path=s3://bucket/runs"], {},  # the MLflow store would still die
     ["workdir: 'runs/nightly' is relative", "MLFLOW_TRACKING_URI"]),
    (["workdir=/srv/attention", "train.storage_path=checkpoints"], {},
     ["train.storage_path: 'checkpoints' is relative", "object-store URI"]),
])
def test_submit_refuses_paths_the_jobs_temporary_directory_would_take_with_it(overrides, environ, needles, capsys,
                                                                               monkeypatch):
    # refused on this machine, before the (closed) dashboard is contacted or anything is uploaded
    for var in ("MLFLOW_TRACKING_URI", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    address = f"http://127.0.0.1:{_closed_port()}"
    assert main(["submit", "--address", address, "--no-pip", *[a for o in overrides for a in ("--set", o)]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(n in err for n in needles) and "cannot reach" not in err, err


@pytest.mark.parametrize(("overrides", "environ"), [
    (["workdir=/srv/attention"], {}),
    (["workdir=~/attention"], {}),  # the head's home directory, not the job's
    (["train.storage_path=s3://bucket/runs"], {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}),
    (["train.storage_path=s3://bucket/runs", "registry.tracking_uri=http://mlflow:5000"], {}),
])
def test_submit_accepts_paths_that_outlive_the_job(overrides, environ):
    check_job_paths(load_config(overrides=overrides), environ)
    with pytest.raises(UserError, match="cannot reach the Ray dashboard"):  # it went on to the cluster
        submit_pipeline(f"http://127.0.0.1:{_closed_port()}", overrides=overrides, environ=environ, pip=False)


def test_missing_config_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="config file not found"):
        build_entrypoint(str(tmp_path / "absent.yaml"), [])


# ------------------------------------------------------------------------------------ runtime_env
def test_pip_requirements_are_pyproject_minus_ray():
    from packaging.requirements import Requirement

    declared = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = pip_requirements()
    assert reqs == [d for d in declared if Requirement(d).name != "ray"]
    assert "ray" not in {Requirement(r).name for r in reqs} and any(r.startswith("torch") for r in reqs)


def test_runtime_env_passes_through_only_the_named_variables():
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "PREFECT_API_URL": "http://prefect:4200/api",
               "RAY_AUTH_TOKEN": "secret", "MLFLOW_TRACKING_PASSWORD": "secret", "AWS_SECRET_ACCESS_KEY": "secret",
               "HOME": "/root"}
    env = build_runtime_env(PROJECT_DIR, pip=False, environ=environ)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                               "PREFECT_API_URL": "http://prefect:4200/api", "PYTHONUNBUFFERED": "1"}
    assert set(PASSTHROUGH_ENV) == {"MLFLOW_TRACKING_URI", "PREFECT_API_URL"}
    assert "secret" not in repr(env)


@pytest.mark.parametrize("pip", [True, False])
def test_runtime_env_is_valid_for_ray(pip: bool):
    from ray.runtime_env import RuntimeEnv

    env = build_runtime_env(PROJECT_DIR, pip=pip, environ={"MLFLOW_TRACKING_URI": "sqlite:////tmp/m.db"})
    assert env["working_dir"] == str(PROJECT_DIR)
    assert ("pip" in env) is pip
    if pip:
        assert env["pip"]["packages"] == pip_requirements()
    RuntimeEnv(**env)  # raises on any field Ray rejects


def test_working_dir_upload_leaves_out_secrets_state_and_large_files(tmp_path: Path):
    from ray._private.runtime_env.packaging import create_package

    project = tmp_path / "project"
    for rel, size in {"flows/__init__.py": 10, "flows/x.py": 10, "pyproject.toml": 10, "infra/.env": 10,
                      "infra/.env.example": 10, ".venv/bin/python": 10, "workdir/data/tokens.bin": 10,
                      ".git/HEAD": 10, "flows/__pycache__/x.pyc": 10, "corpus/big.txt": 4096,
                      "model.safetensors": 10}.items():
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        (project / rel).write_bytes(b"x" * size)
    env = build_runtime_env(project, pip=False, environ={})
    assert large_file_excludes(project, limit=1024) == ["/corpus/big.txt"]

    target = tmp_path / "pkg.zip"
    create_package(str(project), target, include_gitignore=True,
                   excludes=env["excludes"] + large_file_excludes(project, limit=1024))
    shipped = {n for n in zipfile.ZipFile(target).namelist() if not n.endswith("/")}
    assert shipped == {"flows/__init__.py", "flows/x.py", "pyproject.toml"}
    assert {".venv", "workdir", ".git", ".env"} <= set(EXCLUDES)


# ------------------------------------------------------------------------------------ the cluster
@pytest.mark.parametrize(("given", "expected"), [
    ("http://head:8265/", "http://head:8265"),
    ("head:8265", "http://head:8265"),
    ("https://ray.example.com", "https://ray.example.com"),
])
def test_address_normalisation(given, expected):
    assert normalize_address(given) == expected


@pytest.mark.parametrize(("given", "message"), [
    ("ray://head:10001", "not a Ray Client address"),
    ("ftp://head", "expected http"),
    (None, "--address .*is required"),
])
def test_bad_addresses(given, message):
    with pytest.raises(UserError, match=message):
        normalize_address(given)


def test_address_from_the_environment_is_read_by_the_cli_only(monkeypatch, capsys):
    port = _closed_port()
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
    # the CLI took the variable
    assert main(["submit", "--no-pip", "--set", "workdir=/srv/attention", "--set", "train.max_steps=2"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
    with pytest.raises(UserError, match="is required"):
        normalize_address(None)  # the module itself reads no environment


def test_token_sources(tmp_path: Path):
    token_file = tmp_path / "auth_token"
    token_file.write_text("from-file\n")
    assert _auth_headers({"RAY_AUTH_TOKEN": "abc"}) == {"Authorization": "Bearer abc"}
    assert _auth_headers({"RAY_AUTH_TOKEN_PATH": str(token_file)}) == {"Authorization": "Bearer from-file"}
    assert _auth_headers({}) == {}
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        _auth_headers({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_unreachable_dashboard_is_one_line_exit_2(capsys):
    address = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UserError, match="cannot reach the Ray dashboard"):
        check_cluster(address, {}, timeout=5)
    assert main(["submit", "--address", address, "--no-pip", "--set", "workdir=/srv/attention",
                 "--set", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Ray dashboard at " + address) and err.count("\n") == 1


def test_submit_cli_arguments():
    args = build_parser().parse_args(["submit", "--address", "http://h:8265", "--config", "c.yaml",
                                      "--set", "a.b=1", "--set", "c.d=2", "--no-wait", "--no-pip"])
    assert (args.address, args.config, args.overrides, args.wait, args.pip) == (
        "http://h:8265", "c.yaml", ["a.b=1", "c.d=2"], False, False)
    defaults = build_parser().parse_args(["submit"])
    assert (defaults.address, defaults.wait, defaults.pip) == (None, True, True)
