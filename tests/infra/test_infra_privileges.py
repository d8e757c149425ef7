"""The deployment files under infra/ hold up when used: least privilege, no placeholder secret ever
starts a service, and the image's user exists on both bases.

Docker does not run here, so the shell pieces the containers run are run here instead: the placeholder
guard (infra/bin/require-secrets) with each compose service's environment resolved from
infra/.env.example, and the cluster launcher's `ray start` line through it, under dash and bash (the
/bin/sh of the Debian/Ubuntu images and of the MinIO images); MinIO's init script against a stand-in
`mc` that records its calls; and the image's user creation (infra/bin/create-app-user) with the real
useradd/usermod/groupmod, in a private mount namespace whose /etc and /home are scratch copies, on the
account database of the Debian base and on that of Ubuntu 24.04 (user `ubuntu` with uid 1000).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
GUARD = INFRA / "bin" / "require-secrets"
CREATE_USER = INFRA / "bin" / "create-app-user"
PLACEHOLDER = "change-me"
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]
STARTED = "STARTED"
START = ["sh", "-c", f"echo {STARTED}"]  # the service's command, as the guard would exec it

# The infra/.env variables each compose service may receive, and no more. Ray nodes: the token and
# the pipeline's MLflow login. Database, MinIO root and MLflow admin credentials stay with the
# services that use them.
RAY_NODE = {"IMAGE_BASE", "RAY_AUTH_TOKEN", "MLFLOW_PIPELINE_USERNAME", "MLFLOW_PIPELINE_PASSWORD"}
ALLOWED = {
    "postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
    "minio-init": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD", "MLFLOW_BUCKET", "MINIO_MLFLOW_USER",
                   "MINIO_MLFLOW_PASSWORD"},
    "mlflow": {"IMAGE_BASE", "POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_BUCKET", "MINIO_MLFLOW_USER",
               "MINIO_MLFLOW_PASSWORD", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD",
               "MLFLOW_FLASK_SERVER_SECRET_KEY"},
    "mlflow-init": {"IMAGE_BASE", "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_PIPELINE_USERNAME",
                    "MLFLOW_PIPELINE_PASSWORD"},
    "prefect-server": {"IMAGE_BASE", "POSTGRES_USER", "POSTGRES_PASSWORD", "PREFECT_AUTH_STRING"},
    "prefect-worker": RAY_NODE | {"PREFECT_AUTH_STRING"},
    "ray-head": RAY_NODE,
    "ray-gpu-worker": RAY_NODE,
}
ROOT_OR_ADMIN = re.compile(r"^(POSTGRES_|MINIO_ROOT_|MLFLOW_ADMIN_|MLFLOW_FLASK_|PREFECT_AUTH)")
# The whole environment of a node of the cluster launcher (infra/ray-nodes.env).
LAUNCHER_NODE_ENV = {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())["services"]


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    return env_file(INFRA / ".env.example")


def referenced(node) -> set[str]:
    """The infra/.env variables a parsed YAML tree interpolates."""
    if isinstance(node, dict):
        return set().union(*(referenced(k) | referenced(v) for k, v in node.items()))
    if isinstance(node, list):
        return set().union(*(referenced(v) for v in node))
    return {m.group(1) for m in INTERPOLATION.finditer(node)} if isinstance(node, str) else set()


def resolve(text: str, values: dict[str, str]) -> str:
    """Compose's interpolation of one value with infra/.env `values`."""
    def one(m: re.Match) -> str:
        value = values.get(m.group(1), "")
        if not value and m.group(2) in (":-", "-"):
            return m.group(3)
        assert value or m.group(2) != ":?", f"{m.group(1)} is required"
        return value
    return INTERPOLATION.sub(one, text).replace("$$", "$")


def container_env(service: dict, values: dict[str, str]) -> dict[str, str]:
    return {k: resolve(str(v), values) for k, v in (service.get("environment") or {}).items()}


def guard(shell: str, env: dict[str, str], argv: list[str] = START) -> subprocess.CompletedProcess:
    """require-secrets under `shell` with exactly `env` (and PATH), as a container's entrypoint runs it."""
    return subprocess.run([shell, str(GUARD), *argv], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=30)


def refused(result: subprocess.CompletedProcess) -> set[str]:
    """The variable names a refusal lists (its one line: `...: NAME NAME (...)`)."""
    assert result.returncode == 2 and STARTED not in result.stdout, result
    [line] = result.stderr.strip().splitlines()
    return set(line.split(f"'{PLACEHOLDER}':", 1)[1].split("(", 1)[0].split())


def secrets_for(values: dict[str, str]) -> dict[str, str]:
    """`values` with every placeholder replaced by a distinct, recognisable secret."""
    return {k: v.replace(PLACEHOLDER, f"s3cr3t-{k.lower()}-x9") for k, v in values.items()}


# --------------------------------------------------------------------------------- least privilege
def test_each_container_gets_only_the_credentials_it_uses(services):
    assert set(services) == set(ALLOWED), "a new service needs its row in ALLOWED"
    for name, service in services.items():
        assert "env_file" not in service, f"{name}: env_file hands over all of infra/.env"
        assert referenced(service) == ALLOWED[name], f"{name} gets {sorted(referenced(service))}"


def test_ray_nodes_hold_no_root_or_admin_credential(services):
    ray_nodes = [n for n, s in services.items()
                 if s.get("command", [])[:2] == ["ray", "start"] or "RAY_ADDRESS" in (s.get("environment") or {})]
    assert sorted(ray_nodes) == ["prefect-worker", "ray-gpu-worker", "ray-head"]
    for name in ray_nodes:
        assert not {v for v in referenced(services[name]) if ROOT_OR_ADMIN.match(v)} - {"PREFECT_AUTH_STRING"}, name
        user = services[name]["environment"]["MLFLOW_TRACKING_USERNAME"]
        assert INTERPOLATION.fullmatch(user).group(1) == "MLFLOW_PIPELINE_USERNAME", name
    # The cluster launcher's nodes get infra/ray-nodes.env, which holds this and nothing else.
    assert set(env_file(INFRA / "ray-nodes.env.example")) == LAUNCHER_NODE_ENV
    assert "infra/ray-nodes.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_pipeline_user_is_not_the_admin(example):
    assert example["MLFLOW_PIPELINE_USERNAME"] != example["MLFLOW_ADMIN_USERNAME"]
    assert example["MINIO_MLFLOW_USER"] != example["MINIO_ROOT_USER"]


def _run_minio_init(tmp_path: Path, attach_rc: int = 0, user_info: str = "") -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """infra/minio/init.sh with a stand-in `mc` that records each call (and answers `attach` with
    `attach_rc`, `admin user info` with `user_info`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "mc.log"
    mc = bin_dir / "mc"
    mc.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\t" "$a"; done >>"$MC_LOG"; echo >>"$MC_LOG"\n'
                  'case "$1 $2 $3" in\n  "admin policy attach") exit "$ATTACH_RC" ;;\n'
                  '  "admin user info") echo "$USER_INFO" ;;\nesac\n')
    mc.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "TMPDIR": str(tmp_path), "MC_LOG": str(log),
           "ATTACH_RC": str(attach_rc), "USER_INFO": user_info,
           "MINIO_ROOT_USER": "root-user", "MINIO_ROOT_PASSWORD": "root-secret-1", "BUCKET": "art-bucket",
           "MINIO_MLFLOW_USER": "mlflow-user", "MINIO_MLFLOW_PASSWORD": "mlflow-secret-2"}
    result = subprocess.run(["sh", str(INFRA / "minio" / "init.sh")], env=env, capture_output=True, text=True,
                            timeout=30)
    calls = [line.split("\t")[:-1] for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


def test_mlflow_reaches_minio_with_a_user_limited_to_its_bucket(services, tmp_path):
    mlflow_env = services["mlflow"]["environment"]
    assert INTERPOLATION.fullmatch(mlflow_env["AWS_ACCESS_KEY_ID"]).group(1) == "MINIO_MLFLOW_USER"
    assert INTERPOLATION.fullmatch(mlflow_env["AWS_SECRET_ACCESS_KEY"]).group(1) == "MINIO_MLFLOW_PASSWORD"
    init = services["minio-init"]
    [script] = [v.split(":")[1] for v in init["volumes"] if v.split(":")[0] == "./minio/init.sh"]
    assert init["entrypoint"][-2:] == ["/bin/sh", script]

    result, calls = _run_minio_init(tmp_path)
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["alias", "set", "local", "http://minio:9000", "root-user", "root-secret-1"]
    assert ["mb", "--ignore-existing", "local/art-bucket"] in calls
    assert ["admin", "user", "add", "local", "mlflow-user", "mlflow-secret-2"] in calls
    [create] = [c for c in calls if c[:3] == ["admin", "policy", "create"]]
    policy_name, policy_file = create[4], Path(create[5])
    assert ["admin", "policy", "attach", "local", policy_name, "--user", "mlflow-user"] in calls
    assert not [c for c in calls if "root-secret-1" in c and c[:2] != ["alias", "set"]]
    policy = json.loads(policy_file.read_text())
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::art-bucket", "arn:aws:s3:::art-bucket/*"}
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject"} <= actions
    assert all(s["Effect"] == "Allow" for s in policy["Statement"])


def test_minio_init_reruns(tmp_path):
    # An older mc fails `policy attach` when the policy is already attached: only that case passes.
    result, _ = _run_minio_init(tmp_path, attach_rc=1, user_info="Policy: mlflow-artifacts-rw")
    assert result.returncode == 0, result.stderr
    result, _ = _run_minio_init(tmp_path, attach_rc=1, user_info="Policy: readonly")
    assert result.returncode != 0


# --------------------------------------------------------------------------------- placeholder guard
def _dockerfile_entrypoint() -> list[str]:
    [line] = [l for l in (INFRA / "Dockerfile").read_text().splitlines() if l.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


def test_every_container_starts_through_the_guard(services):
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "COPY --chmod=0755 infra/bin/require-secrets /usr/local/bin/require-secrets" in dockerfile
    assert _dockerfile_entrypoint() == ["tini", "--", "require-secrets"]
    for name, service in services.items():
        if "build" in service:  # the project's image: its ENTRYPOINT, unless overridden
            assert "entrypoint" not in service, name
            continue
        entrypoint = service["entrypoint"]
        assert entrypoint[:2] == ["/bin/sh", "/usr/local/bin/require-secrets"] and len(entrypoint) > 2, name
        assert f"./bin/require-secrets:{entrypoint[1]}:ro" in service["volumes"], name
        assert "command" in service or name == "minio-init", f"{name}: an entrypoint clears the image's CMD"


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_every_service_refuses_a_placeholder_secret(name, shell, services, example):
    env = container_env(services[name], example)
    holding = {k for k, v in env.items() if PLACEHOLDER in v}
    assert holding, f"{name} gets no secret from infra/.env.example"
    assert refused(guard(shell, env)) == holding

    # One placeholder left among real secrets: that one is named, no value is printed.
    real = container_env(services[name], secrets_for(example))
    last = sorted(holding)[0]
    result = guard(shell, {**real, last: env[last]})
    assert refused(result) == {last}
    assert not [v for v in real.values() if "s3cr3t" in v and v in result.stderr + result.stdout]

    started = guard(shell, real)
    assert started.returncode == 0 and started.stdout.strip() == STARTED, started


@pytest.mark.parametrize("shell", SHELLS)
def test_guard_reads_every_variable_and_needs_a_command(shell):
    env = {"A": "fine", "B": f"user:{PLACEHOLDER}", "C": f"multi\nline {PLACEHOLDER}\nD=x", "E": "it's \"quoted\""}
    assert refused(guard(shell, env)) == {"B", "C"}
    result = guard(shell, {"A": "fine"}, argv=[])
    assert result.returncode == 2 and "usage" in result.stderr


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_nodes_refuse_a_placeholder_before_ray_starts(key, tmp_path):
    """The launcher's own `ray start` line, run as `docker exec ... bash -c` runs it, with the node's
    environment from infra/ray-nodes.env.example."""
    launcher = yaml.safe_load((INFRA / "ray-cluster-gpu.yaml").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy(GUARD, bin_dir / "require-secrets")
    (bin_dir / "ray").write_text(f'#!/bin/sh\necho "$@" >"{tmp_path}/ray.args"\n')
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    run_options = launcher["docker"]["run_options"]
    extra = dict(o.split()[1].split("=", 1) for o in run_options if o.startswith("--env "))
    command = launcher[key][-1]

    def node(values: dict[str, str]) -> subprocess.CompletedProcess:
        env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_HEAD_IP": "10.0.0.1", **extra, **values}
        return subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)

    template = env_file(INFRA / "ray-nodes.env.example")
    assert refused(node(template)) == {k for k, v in template.items() if PLACEHOLDER in v} != set()
    assert not (tmp_path / "ray.args").exists(), "ray started with a placeholder secret"
    result = node(secrets_for(template))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ray.args").read_text().split()[0] == "start"


def test_kuberay_pods_check_their_secrets_before_ray_starts():
    manifests = [d for p in sorted((INFRA / "kuberay").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    specs = [d["spec"] for d in manifests if d["kind"] == "RayCluster"]
    specs += [d["spec"]["rayClusterSpec"] for d in manifests if d["kind"] == "RayJob"]
    assert len(specs) == 2
    for spec in specs:
        token_ref = {"name": spec["authOptions"]["secretName"], "key": "auth_token"}
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            [check] = pod["initContainers"]
            assert check["command"][0] == "require-secrets" and len(check["command"]) > 1
            assert {c["image"] for c in pod["containers"]} == {check["image"]}
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in check["env"]}
            assert refs["RAY_AUTH_TOKEN"] == token_ref
            for container in pod["containers"]:
                for var in container.get("env", []):
                    if "secretKeyRef" in var.get("valueFrom", {}):
                        assert refs.get(var["name"]) == var["valueFrom"]["secretKeyRef"], var["name"]


# --------------------------------------------------------------------------------- the image's user
def _dockerfile_user_step() -> tuple[str, str]:
    """(uid, name) the Dockerfile gives create-app-user, with the uid ARG's default."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    runtime = text[text.index("AS runtime"):]
    assert "useradd" not in runtime, "user creation belongs in infra/bin/create-app-user (both bases)"
    assert not re.search(r"^ARG UID\b", runtime, re.M), "bash's UID is read-only: the ARG has another name"
    step = re.search(r'^RUN --mount=type=bind,source=infra/bin/create-app-user,target=(\S+) +sh \1 '
                     r'"\$\{(\w+)\}" (\w+) ', runtime, re.M)
    assert step, "the Dockerfile runs infra/bin/create-app-user"
    arg, name = step.group(2), step.group(3)
    uid = re.search(rf"^ARG {arg}=(\d+)$", runtime, re.M).group(1)
    assert f"chown {name}:{name} /app/workdir" in runtime and re.search(rf"^USER {name}$", runtime, re.M)
    return uid, name


@pytest.fixture
def scratch_root(tmp_path) -> Path:
    """A copy of this machine's /etc with every account of uid/gid 1000..65533 removed (the account
    database of a bare Debian bookworm image, which this machine is), and an empty /home."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) to run useradd in a private mount namespace")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --mount is not permitted here: {probe.stderr.strip()}")
    etc, home, mail = tmp_path / "etc", tmp_path / "home", tmp_path / "mail"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    home.mkdir()
    mail.mkdir()

    def local(line: str, field: int) -> bool:
        return 1000 <= int(line.split(":")[field]) < 65534

    users = {l.split(":")[0] for l in (etc / "passwd").read_text().splitlines() if local(l, 2)}
    groups = {l.split(":")[0] for l in (etc / "group").read_text().splitlines() if local(l, 2)}
    for file, names in (("passwd", users), ("shadow", users), ("subuid", users), ("subgid", users),
                        ("group", groups), ("gshadow", groups)):
        if (etc / file).exists():
            kept = [l for l in (etc / file).read_text().splitlines() if l.split(":")[0] not in names]
            (etc / file).write_text("".join(l + "\n" for l in kept))
    return tmp_path


def in_scratch(root: Path, script: str) -> subprocess.CompletedProcess:
    mounts = " && ".join(f"mount --bind {root / src} {dst}" for src, dst in
                         (("etc", "/etc"), ("home", "/home"), ("mail", "/var/mail")))
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f"{mounts} && {script}"],
                          capture_output=True, text=True, timeout=60)


def accounts(root: Path, file: str) -> dict[str, list[str]]:
    return {l.split(":")[0]: l.split(":") for l in (root / "etc" / file).read_text().splitlines() if l}


UBUNTU_2404 = "useradd --uid 1000 --user-group --create-home --shell /bin/bash ubuntu"  # as its image has it


@pytest.mark.parametrize("base", ["debian-bookworm", "ubuntu-24.04"])
def test_the_image_user_is_created_on_both_bases(base, scratch_root):
    uid, name = _dockerfile_user_step()
    setup = "true"
    if base == "ubuntu-24.04":
        # The base's own user, with a file in its home; the old Dockerfile line fails on it.
        setup = (f"{UBUNTU_2404} && touch /home/ubuntu/kept && "
                 f"if useradd --uid {uid} --create-home {name}; then exit 90; fi")
    step = f"sh {CREATE_USER} {uid} {name}"
    host_passwd = Path("/etc/passwd").read_bytes()
    result = in_scratch(scratch_root, f"{setup} && {step} && {step}")  # twice: a rebuild's rerun is a no-op
    assert result.returncode == 0, result.stdout + result.stderr

    passwd, group = accounts(scratch_root, "passwd"), accounts(scratch_root, "group")
    assert passwd[name][2] == uid and passwd[name][5] == f"/home/{name}"
    assert group[name][2] == passwd[name][3], "the user's primary group is its own"
    assert [n for n, p in passwd.items() if p[2] == uid] == [name]
    home = scratch_root / "home" / name
    assert home.is_dir() and home.stat().st_uid == int(uid)
    assert name in accounts(scratch_root, "shadow")
    if base == "ubuntu-24.04":
        assert "ubuntu" not in passwd and "ubuntu" not in group
        assert group[name][2] == "1000" and (home / "kept").exists()  # the same ids, the home moved
    assert Path("/etc/passwd").read_bytes() == host_passwd, "the namespace leaked onto this machine's /etc"


def test_create_app_user_refuses_when_the_name_is_another_user(scratch_root):
    result = in_scratch(scratch_root, f"{UBUNTU_2404} && useradd --uid 1001 app && sh {CREATE_USER} 1000 app")
    assert result.returncode == 1 and "uid 1000 is ubuntu and app is another user" in result.stderr


# --------------------------------------------------------------------------------- mlflow-init
@pytest.mark.parametrize(("pipeline_user", "expected"), [
    ("admin", "MLFLOW_PIPELINE_USERNAME is the admin (admin)"),
    ("", "set MLFLOW_PIPELINE_USERNAME"),
])
def test_mlflow_init_refuses_without_a_user_of_the_pipelines_own(pipeline_user, expected):
    """Before any request (the tracking URI is a closed port): exit 2 and one line naming the key."""
    import sys

    env = {"PATH": os.environ["PATH"], "MLFLOW_TRACKING_URI": "http://127.0.0.1:9", "MLFLOW_TRACKING_USERNAME": "admin",
           "MLFLOW_TRACKING_PASSWORD": "admin-secret-x9", "MLFLOW_PIPELINE_USERNAME": pipeline_user,
           "MLFLOW_PIPELINE_PASSWORD": "pipeline-secret-x9"}
    result = subprocess.run([sys.executable, str(INFRA / "mlflow" / "create_pipeline_user.py")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.splitlines()) == 1
    assert "secret-x9" not in result.stderr + result.stdout
