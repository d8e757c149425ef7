"""Static checks of the deployment files under infra/ (Docker and Kubernetes do not run here).

Every YAML parses; the compose services, ports and environment variables agree with each other and
with infra/.env.example, and no secret is written in a committed file; the KubeRay manifests carry
the fields KubeRay requires; the cluster launcher is complete; and every command the files run
exists: `python -m flows ...` parses with the project's own parser (and its config validates), and
`ray` / `mlflow` / `prefect` subcommands and options exist in the project's environment (checked
against their --help).
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shlex
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from flows.__main__ import build_parser
from flows.config import load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BIN = Path(sysconfig.get_path("scripts"))
YAML_FILES = sorted(INFRA.rglob("*.yaml")) + [ROOT / "prefect.yaml"]
PROJECT_IMAGE = "attention-pipeline"  # compose tag; the registry image for clusters ends with it
WORKDIR_MOUNT = "/app/workdir"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|ACCESS_KEY", re.I)
# ${VAR}, ${VAR:-default}, ${VAR:?error}; `$${VAR}` is compose's escape for the container's own shell.
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
CONTAINER_VAR = re.compile(r"\$\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
HOST_PORT = re.compile(r"(?:^|[/@=,\s])([a-z][a-z0-9-]*):(\d{2,5})\b")
PROJECT_TOOLS = {"ray", "mlflow", "prefect"}  # console scripts the image gets from the project's requirements
IMAGE_TOOLS = {"curl", "tini"}  # installed by infra/Dockerfile's apt-get line
BASE_TOOLS = {"true"}  # coreutils: in both bases (Debian and Ubuntu)


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strings(node):
    """Every string in a parsed YAML tree (comments are gone by then)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    pairs = {}
    for line in (INFRA / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def ours(service: dict) -> bool:
    """Built from infra/Dockerfile (runs project code), as opposed to a stock image."""
    return "build" in service or str(service.get("image", "")).startswith(PROJECT_IMAGE)


def expose(service: dict) -> set[int]:
    return {int(p) for p in service.get("expose", [])}


# --------------------------------------------------------------------------------------- YAML
@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_parses_to_mappings(path: Path):
    docs = load_docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)


# --------------------------------------------------------------------------------------- compose
def test_compose_has_the_whole_stack(services):
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "ray-head",
            "ray-gpu-worker"} <= set(services)


def test_compose_variables_are_exactly_those_of_env_example(compose, env_example):
    referenced = {m.group(1) for s in strings(compose) for m in INTERPOLATION.finditer(s)}
    assert referenced == set(env_example), "compose.yaml and infra/.env.example disagree"


def test_no_secret_is_committed(compose, services, env_example):
    for name, value in env_example.items():
        if SECRET_NAME.search(name):
            assert "change-me" in value, f".env.example {name} must be a change-me placeholder"
    for s in strings(compose):
        for m in INTERPOLATION.finditer(s):
            if SECRET_NAME.search(m.group(1)):
                assert m.group(2) == ":?", f"${{{m.group(1)}}} must be required (:?), never defaulted"
    for svc_name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert INTERPOLATION.fullmatch(str(value)), f"{svc_name}.{key} must come from infra/.env"
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "infra/.env" in ignored
    if (ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=ROOT)
        assert check.returncode == 0, "git must ignore infra/.env"


def test_container_side_variables_are_set_in_that_container(services):
    for name, svc in services.items():
        env = svc.get("environment") or {}
        for text in strings([svc.get("command"), svc.get("entrypoint"), svc.get("healthcheck")]):
            for var in CONTAINER_VAR.findall(text):
                assert var in env, f"{name} uses $${{{var}}} but does not set {var}"


def test_addresses_name_a_service_and_one_of_its_exposed_ports(services):
    for name, svc in services.items():
        texts = list(strings([svc.get("environment"), svc.get("command"), svc.get("healthcheck")]))
        for text in texts:
            for host, port in HOST_PORT.findall(text):
                target = name if host == "localhost" else host
                if target in services:
                    assert int(port) in expose(services[target]), f"{name}: {host}:{port} is not exposed by {target}"


def _flag_values(argv: list[str], *flags: str) -> list[str]:
    values = []
    for i, tok in enumerate(argv):
        for flag in flags:
            if tok.startswith(flag + "="):
                values.append(tok.split("=", 1)[1])
            elif tok == flag and i + 1 < len(argv):
                values.append(argv[i + 1])
    return values


def test_servers_listen_on_their_exposed_and_published_ports(services):
    for name, svc in services.items():
        argv = svc.get("command") if isinstance(svc.get("command"), list) else []
        for value in _flag_values(argv, "--port", "--dashboard-port", "--address", "--console-address"):
            if value.startswith(":") or value.isdigit():
                assert int(value.lstrip(":")) in expose(svc), f"{name} listens on {value} but does not expose it"
        for mapping in svc.get("ports", []):
            host_ip, _, container = str(mapping).rpartition(":")
            assert host_ip.startswith("127.0.0.1:"), f"{name}: publish on 127.0.0.1 only, got {mapping}"
            assert int(container) in expose(svc)


def test_depends_on_conditions_hold(services):
    for name, svc in services.items():
        for target, spec in (svc.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown {target}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} is a one-shot: restart: 'no'"


def test_ray_nodes_and_drivers_use_token_auth(services):
    heads = [n for n, s in services.items() if s.get("command", [])[:3] == ["ray", "start", "--head"]]
    assert heads == ["ray-head"]
    gcs_port = int(_flag_values(services["ray-head"]["command"], "--port")[0])
    ray_users = {n for n, s in services.items()
                 if s.get("command", [])[:2] == ["ray", "start"] or "RAY_ADDRESS" in (s.get("environment") or {})}
    assert ray_users == {"ray-head", "ray-gpu-worker", "prefect-worker"}
    for name in ray_users:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert INTERPOLATION.fullmatch(env["RAY_AUTH_TOKEN"]).group(1) == "RAY_AUTH_TOKEN", name
    assert _flag_values(services["ray-gpu-worker"]["command"], "--address") == [f"ray-head:{gcs_port}"]
    assert services["prefect-worker"]["environment"]["RAY_ADDRESS"] == f"ray-head:{gcs_port}"
    devices = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_pipeline_containers_share_the_workdir_volume(compose, services):
    for name in ("prefect-worker", "ray-head", "ray-gpu-worker"):
        assert f"workdir:{WORKDIR_MOUNT}" in services[name]["volumes"], name
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: bind-mount source {source} is missing"
            else:
                assert source in compose["volumes"], f"{name}: volume {source} is not declared"


def test_mlflow_server_wiring(services):
    mlflow = services["mlflow"]
    argv, env = mlflow["command"], mlflow["environment"]
    assert "--app-name=basic-auth" in argv and "--serve-artifacts" in argv
    [destination] = _flag_values(argv, "--artifacts-destination")
    bucket_var = INTERPOLATION.search(destination).group(1)
    assert destination.startswith("s3://")
    assert INTERPOLATION.search(services["minio-init"]["environment"]["BUCKET"]).group(1) == bucket_var
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://") and backend.endswith(f"@postgres:5432/{services['postgres']['environment']['POSTGRES_DB']}")
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    # The auth config is the committed file (copied into the image at /app/infra/...).
    ini = ROOT / env["MLFLOW_AUTH_CONFIG_PATH"].removeprefix("/app/")
    parser = configparser.ConfigParser()
    assert parser.read(ini), f"{ini} is missing"
    auth_db = parser["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert any(auth_db.startswith(v.split(":")[1] + "/") for v in mlflow["volumes"]), "auth DB not on a volume"
    assert "admin_password" not in parser["mlflow"]  # it comes from MLFLOW_AUTH_ADMIN_PASSWORD
    # mlflow-init logs in as the admin and creates the pipeline's user; the pipeline logs in as that user.
    init_env = services["mlflow-init"]["environment"]
    assert init_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert init_env["MLFLOW_TRACKING_USERNAME"] == env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert init_env["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert services["mlflow-init"]["depends_on"]["mlflow"]["condition"] == "service_healthy"
    for client in ("prefect-worker", "ray-head", "ray-gpu-worker"):
        client_env = services[client]["environment"]
        assert client_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert client_env["MLFLOW_TRACKING_USERNAME"] == init_env["MLFLOW_PIPELINE_USERNAME"]
        assert client_env["MLFLOW_TRACKING_PASSWORD"] == init_env["MLFLOW_PIPELINE_PASSWORD"]
    for client in ("prefect-worker", "ray-head"):  # the Ray worker joins the head, which waits
        assert services[client]["depends_on"]["mlflow-init"]["condition"] == "service_completed_successfully"


def test_prefect_server_and_worker_wiring(services):
    server_env = services["prefect-server"]["environment"]
    db_url = server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert db_url.startswith("postgresql+asyncpg://") and db_url.endswith("@postgres:5432/prefect")
    assert "CREATE DATABASE prefect;" in (INFRA / "postgres" / "init.sql").read_text()
    worker_env = services["prefect-worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["PREFECT_API_AUTH_STRING"] == server_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert worker_env["ATTENTION_PIPELINE_DIR"] == _dockerfile_workdir()
    pools = {d["work_pool"]["name"] for d in load_docs(ROOT / "prefect.yaml")[0]["deployments"]}
    script = services["prefect-worker"]["command"][-1]
    for pool in pools:
        assert f"--pool {pool}" in script and f"work-pool create {pool}" in script


def test_environment_variable_names_are_known_settings(services):
    from mlflow import environment_variables as mlflow_env
    from mlflow.cli import server as mlflow_server
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_settings_fields

    prefect_names = set(_get_settings_fields(Settings))
    mlflow_names = {v.name for v in vars(mlflow_env).values() if isinstance(getattr(v, "name", None), str)}
    mlflow_names |= {p.envvar for p in mlflow_server.params if isinstance(p.envvar, str)}
    mlflow_names |= set(_script_variables())  # read by the project's own mlflow-init script
    for name, svc in services.items():
        for key in svc.get("environment") or {}:
            if key.startswith("PREFECT_"):
                assert key in prefect_names, f"{name}: {key} is not a Prefect setting"
            if key.startswith("MLFLOW_"):
                assert key in mlflow_names, f"{name}: {key} is not an MLflow variable"


def _script_variables() -> tuple[str, ...]:
    """REQUIRED of infra/mlflow/create_pipeline_user.py: the variables that script reads."""
    tree = ast.parse((INFRA / "mlflow" / "create_pipeline_user.py").read_text())
    [node] = [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "REQUIRED"]
    return ast.literal_eval(node.value)


def test_compose_builds_infra_dockerfile(services, env_example):
    stages, args = _dockerfile_stages_and_args()
    for name, svc in services.items():
        if "build" in svc:
            build = svc["build"]
            assert (INFRA / build["context"] / build["dockerfile"]).resolve() == INFRA / "Dockerfile"
            assert set(build.get("args", {})) <= args, f"{name}: build args not declared in the Dockerfile"
    assert env_example["IMAGE_BASE"] in {"cpu", "cuda"}
    assert {f"base-{b}" for b in ("cpu", "cuda")} <= stages


# --------------------------------------------------------------------------------------- Dockerfile
def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def _dockerfile_stages_and_args() -> tuple[set[str], set[str]]:
    stages, args = set(), set()
    for op, rest in _dockerfile_instructions():
        if op == "FROM" and " AS " in rest.upper():
            stages.add(rest.split()[-1])
        if op == "ARG":
            args.add(rest.split("=")[0])
    return stages, args


def _dockerfile_workdir() -> str:
    return [rest for op, rest in _dockerfile_instructions() if op == "WORKDIR"][-1]


def test_dockerfile_selects_cpu_or_cuda_base_by_build_argument():
    instructions = _dockerfile_instructions()
    first_from = next(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    assert ("ARG", "BASE=cpu") in instructions[:first_from]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert any(f.startswith("base-${BASE}") for f in froms)
    assert any(f.endswith("AS base-cpu") for f in froms) and any(f.endswith("AS base-cuda") for f in froms)
    cuda_from = next(f for f in froms if f.endswith("AS base-cuda"))
    cuda_image = next(rest for op, rest in instructions if op == "ARG" and rest.startswith("CUDA_IMAGE="))
    assert cuda_from.startswith("${CUDA_IMAGE}") and "nvidia/cuda" in cuda_image


def test_dockerfile_copies_existing_sources_the_context_lets_through():
    allowed = [line[1:] for line in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    copied = []
    for op, rest in _dockerfile_instructions():
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = [t for t in rest.split() if not t.startswith("--")]
            copied += sources
        if op == "RUN":  # RUN --mount=type=bind,source=...: read from the context too
            copied += re.findall(r"--mount=type=bind,source=([^,\s]+)", rest)
    assert {"pyproject.toml", "attention_core", "flows", "prefect.yaml", "infra/mlflow",
            "infra/bin/require-secrets", "infra/bin/create-app-user"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert any(source == a or source.startswith(a + "/") for a in allowed), \
            f"COPY {source}: excluded by infra/Dockerfile.dockerignore"
    rules = [l for l in (INFRA / "Dockerfile.dockerignore").read_text().splitlines() if l and not l.startswith("#")]
    assert rules[0] == "**", "the context is deny-by-default: .env files, .venv and workdir never reach the build"


def test_dockerfile_installs_ray_with_its_dashboard_and_the_image_tools():
    runs = " ".join(rest for op, rest in _dockerfile_instructions() if op == "RUN")
    assert '"ray[default,train]==${RAY_VERSION}"' in runs
    import ray

    assert ("ARG", f"RAY_VERSION={ray.__version__}") in _dockerfile_instructions()
    apt = re.search(r"apt-get install[^&]*", runs).group(0).split()
    assert IMAGE_TOOLS <= set(apt)
    # The compose stack's MLflow server runs the basic-auth app, which imports Flask-WTF (mlflow[auth]).
    assert '"mlflow[auth]"' in runs


# --------------------------------------------------------------------------------------- KubeRay
KUBERAY = {p.name: load_docs(p) for p in sorted((INFRA / "kuberay").glob("*.yaml"))}


def _ray_docs(kind: str) -> list[dict]:
    return [d for docs in KUBERAY.values() for d in docs if d.get("kind") == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in _ray_docs("RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in _ray_docs("RayJob")]
    return specs


def _containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_are_ray_io_v1():
    assert len(_ray_docs("RayCluster")) == 1 and len(_ray_docs("RayJob")) == 1
    for docs in KUBERAY.values():
        for doc in docs:
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1"
                assert doc["metadata"]["name"]


@pytest.mark.parametrize(("name", "spec"), _cluster_specs(), ids=[n for n, _ in _cluster_specs()])
def test_kuberay_cluster_spec(name: str, spec: dict):
    import ray

    assert spec["rayVersion"] == ray.__version__
    assert spec["authOptions"]["mode"] == "token" and spec["authOptions"]["secretName"]
    head = spec["headGroupSpec"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in head["rayStartParams"].items())
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert 8265 in {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            limits = container["resources"]["limits"]
            assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}/{group['groupName']}: no GPU limit"
            assert container["resources"].get("requests", {}).get("nvidia.com/gpu", limits["nvidia.com/gpu"]) == limits["nvidia.com/gpu"]
    images = {c["image"] for c in _containers(spec)}
    assert len(images) == 1 and images.pop().rsplit(":", 1)[0].endswith(PROJECT_IMAGE)
    pvcs = {d["metadata"]["name"]: d for d in KUBERAY["workdir-pvc.yaml"] if d["kind"] == "PersistentVolumeClaim"}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims and all(c in pvcs and "ReadWriteMany" in pvcs[c]["spec"]["accessModes"] for c in claims)
        for container in pod["containers"]:
            assert WORKDIR_MOUNT in {m["mountPath"] for m in container["volumeMounts"]}
            for var in container.get("env", []):
                if SECRET_NAME.search(var["name"]):
                    assert "secretKeyRef" in var.get("valueFrom", {}), f"{name}: {var['name']} must come from a Secret"


def test_kuberay_rayjob_fields():
    from ray.runtime_env import RuntimeEnv

    [job] = _ray_docs("RayJob")
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"}
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    RuntimeEnv(**runtime_env)
    assert not [k for k in runtime_env.get("env_vars", {}) if SECRET_NAME.search(k)], "secrets belong in Secrets"
    cfg = _validated_flows_command(shlex.split(spec["entrypoint"]))
    assert cfg.workdir == WORKDIR_MOUNT and cfg.train.use_gpu
    gpus = sum(g["replicas"] * int(c["resources"]["limits"]["nvidia.com/gpu"])
               for g in spec["rayClusterSpec"]["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])
    assert cfg.train.num_workers == gpus, "one Ray Train worker per GPU"


# --------------------------------------------------------------------------------------- launcher
@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((INFRA / "ray-cluster-gpu.yaml").read_text())


def test_cluster_launcher_is_complete(launcher):
    types = launcher["available_node_types"]
    assert launcher["cluster_name"] and launcher["provider"]["type"]
    assert launcher["head_node_type"] in types
    assert types[launcher["head_node_type"]]["resources"].get("CPU") == 0
    gpu_types = [n for n, t in types.items() if re.match(r"(g\d|p\d)", t["node_config"]["InstanceType"])]
    assert gpu_types, "no GPU node type"
    for name, node in types.items():
        if name != launcher["head_node_type"]:
            assert 0 <= node["min_workers"] <= node["max_workers"] <= launcher["max_workers"]
    kuberay_images = {c["image"] for _, spec in _cluster_specs() for c in _containers(spec)}
    assert {launcher["docker"]["image"]} == kuberay_images


def test_cluster_launcher_token_auth_and_shared_workdir(launcher):
    options = launcher["docker"]["run_options"]
    assert "--env RAY_AUTH_MODE=token" in options
    [env_file] = [o.split()[1] for o in options if o.startswith("--env-file ")]
    # infra/ray-nodes.env (git-ignored: the Ray token, the pipeline's MLflow login), never infra/.env
    assert launcher["file_mounts"][env_file] == "./infra/ray-nodes.env"
    assert any(o.startswith("--volume ") and o.endswith(f":{WORKDIR_MOUNT}") for o in options)
    head_port = _flag_values(shlex.split(launcher["head_start_ray_commands"][-1]), "--port")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert shlex.split(launcher[key][-1])[:3] == ["require-secrets", "ray", "start"], key
    assert _flag_values(shlex.split(launcher["worker_start_ray_commands"][-1]), "--address") == [
        f"$RAY_HEAD_IP:{head_port[0]}"]


# --------------------------------------------------------------------------------------- commands
def _shell_commands(script: str) -> list[list[str]]:
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", script) if part.strip()]


def _argvs(command) -> list[list[str]]:
    if isinstance(command, str):
        return _shell_commands(command)
    if command[:2] in (["/bin/sh", "-c"], ["sh", "-c"], ["bash", "-c"]):
        return _shell_commands(command[2])
    return [list(command)]


def collect_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command the deployment files run with the project's image."""
    found = []
    services = yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]
    for name, svc in services.items():
        if ours(svc):
            for argv in _argvs(svc["command"]):
                found.append((f"compose {name}", argv))
            test = svc.get("healthcheck", {}).get("test", [])
            if test[:1] == ["CMD"]:
                found.append((f"compose {name} healthcheck", test[1:]))
            elif test[:1] == ["CMD-SHELL"]:
                found += [(f"compose {name} healthcheck", a) for a in _shell_commands(test[1])]
    launcher = yaml.safe_load((INFRA / "ray-cluster-gpu.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        found += [(f"launcher {key}", a) for c in launcher.get(key) or [] for a in _shell_commands(c)]
    for doc in _ray_docs("RayJob"):
        found.append(("RayJob entrypoint", shlex.split(doc["spec"]["entrypoint"])))
    for name, spec in _cluster_specs():
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for init in group["template"]["spec"].get("initContainers", []):
                found.append((f"{name} initContainer {init['name']}", init["command"]))
    cmd = [yaml.safe_load(rest) for op, rest in _dockerfile_instructions() if op == "CMD"][-1]
    found.append(("Dockerfile CMD", cmd))
    return found


COMMANDS = collect_commands()


def _validated_flows_command(argv: list[str]):
    """Parse `python -m flows ...` / `attention-pipeline ...` with the project's parser; for run and
    submit, validate the config it names. Returns the PipelineConfig (None for --help)."""
    args_start = 3 if argv[:3] in (["python", "-m", "flows"], ["python3", "-m", "flows"]) else 1
    rest = argv[args_start:]
    if rest == ["--help"]:
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(rest)
        assert exit_.value.code == 0
        return None
    args = build_parser().parse_args(rest)
    assert args.config is None, "deployment files configure with --set, not a file the image lacks"
    return load_config(args.config, args.overrides)


# Runs a console script's entry point in-process once per subcommand path with --help, so that one
# interpreter start (and one import of the tool) serves every subcommand the files use.
_HELP_SCRIPT = """
import contextlib, io, json, sys
from importlib.metadata import entry_points
tool, paths = sys.argv[1], json.loads(sys.argv[2])
main = next(e for e in entry_points(group="console_scripts") if e.name == tool).load()
out = {}
for path in paths:
    buf, code = io.StringIO(), 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            sys.argv = [tool, *path, "--help"]
            main()
        except SystemExit as exc:
            code = exc.code or 0
        except Exception:
            code = 1
    out[json.dumps(path)] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def _help_options(tool: str, paths: list[tuple[str, ...]]) -> dict[tuple[str, ...], frozenset[str] | None]:
    """{subcommand path: the options its --help lists, or None when it is not a command}."""
    import json
    import sys

    env = {**os.environ, "COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb", "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, tool, json.dumps([list(p) for p in paths])],
                            capture_output=True, text=True, env=env, timeout=300, check=True)
    helps = json.loads(result.stdout.strip().splitlines()[-1])
    return {tuple(json.loads(k)): frozenset(re.findall(r"--[a-z0-9][a-z0-9-]*", text)) if code == 0 else None
            for k, (code, text) in helps.items()}


def _tool_invocation(argv: list[str]) -> tuple[list[str], tuple[str, ...], list[str]]:
    """(global options, subcommand path, options) of `ray start --head ...`-style argv."""
    rest = argv[1:]
    global_opts = []
    while rest and rest[0].startswith("-"):
        global_opts.append(rest.pop(0))
    path = []
    while rest and not rest[0].startswith("-"):
        path.append(rest.pop(0))
    return global_opts, tuple(path), [t.split("=")[0] for t in rest if t.startswith("--")]


@pytest.fixture(scope="module")
def tool_help() -> dict[tuple[str, tuple[str, ...]], frozenset[str] | None]:
    """--help of every tool subcommand (and its prefixes) the files use: one process per tool."""
    wanted: dict[str, set[tuple[str, ...]]] = {}
    for _, argv in COMMANDS:
        if argv[0] in PROJECT_TOOLS:
            _, path, _ = _tool_invocation(argv)
            wanted.setdefault(argv[0], set()).update(path[:n] for n in range(len(path) + 1))
    with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
        results = pool.map(lambda tool: (tool, _help_options(tool, sorted(wanted[tool]))), sorted(wanted))
        return {(tool, path): options for tool, helps in results for path, options in helps.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[f"{w}: {' '.join(a)[:60]}" for w, a in COMMANDS])
def test_every_command_exists(where: str, argv: list[str], tool_help):
    if argv[0] == "require-secrets":  # the image's guard (infra/bin), then the command it starts
        assert len(argv) > 1, f"{where}: require-secrets needs a command to start"
        argv = argv[1:]
    exe = argv[0]
    if exe in ("python", "python3") and argv[1].startswith("/app/infra/"):
        script = ROOT / argv[1].removeprefix("/app/")  # a script of infra/ the image copies to /app/infra
        assert script.is_file(), f"{where}: {argv[1]} is not in the repository"
        compile(script.read_text(), str(script), "exec")
    elif exe in ("python", "python3", "attention-pipeline"):
        assert exe != "python" or argv[1:3] == ["-m", "flows"], f"{where}: runs a module outside the project"
        _validated_flows_command(argv)
    elif exe in PROJECT_TOOLS:
        assert (BIN / exe).is_file(), f"{where}: {exe} is not installed by the project's requirements"
        global_opts, path, options = _tool_invocation(argv)
        assert set(global_opts) <= (tool_help[exe, ()] or set()), f"{where}: unknown {exe} options {global_opts}"
        # The longest prefix of the positional words that has its own --help is the subcommand.
        helps = (tool_help[exe, path[:n]] for n in range(len(path), 0, -1))
        known = next((h for h in helps if h is not None), None)
        assert known is not None, f"{where}: `{exe} {' '.join(path)}` is not a command"
        assert set(options) <= known, f"{where}: unknown options {sorted(set(options) - known)}"
    else:
        assert exe in IMAGE_TOOLS | BASE_TOOLS, f"{where}: {exe} is neither the project's nor installed in the image"


def test_prefect_deployments_point_at_the_flow_and_valid_configs():
    [project] = load_docs(ROOT / "prefect.yaml")
    for deployment in project["deployments"]:
        entrypoint = deployment["entrypoint"]
        if ":" in entrypoint:  # path/to/file.py:function
            file, _, func = entrypoint.partition(":")
        else:  # package.module.function
            module, _, func = entrypoint.rpartition(".")
            file = module.replace(".", "/") + ".py"
        tree = ast.parse((ROOT / file).read_text())
        assert func in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        validate_config(deployment["parameters"]["config"])
