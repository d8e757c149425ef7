"""flows/preflight.py: the closed-form memory estimate, what each worker has, and the one-line refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention_core import ModelConfig, Transformer
from flows.config import load_config
from flows.errors import UserError
from flows.preflight import (WorkerBudget, activation_bytes, check_before_run, check_memory, check_resources,
                             count_params, estimate_memory, worker_budget)

GiB = 1024**3
SHAPES = [
    {},
    {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    {"n_kv_head": 1, "qk_norm": True, "bias": True},
    {"tie_embeddings": False, "mlp_hidden": 40, "bias": True},
    {"n_head": 2, "n_kv_head": 1, "pos": "rope", "tie_embeddings": False, "norm": "rmsnorm", "bias": True},
    {"attn_impl": "explicit", "n_layer": 3},
]


@pytest.mark.parametrize("shape", SHAPES)
def test_count_params_equals_the_built_model(shape):
    cfg = ModelConfig(**{"vocab_size": 97, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, **shape})
    assert count_params(cfg, 97) == Transformer(cfg).num_params(non_embedding=False)


def _saved_activation_bytes(cfg: ModelConfig, batch: int, dtype: torch.dtype | None) -> int:
    """Bytes of the tensors autograd saves for backward in one forward with loss (parameters excluded)."""
    model = Transformer(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x, x)
    return sum(saved.values())


@pytest.mark.filterwarnings("ignore:Mismatch dtype")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_estimate_is_what_autograd_saves(shape, dtype):
    cfg = ModelConfig(**{"vocab_size": 500, "block_size": 32, "n_layer": 2, "n_head": 4, "n_embd": 64, **shape})
    measured = _saved_activation_bytes(cfg, 4, dtype)
    estimate = activation_bytes(cfg, 500, 4, 2 if dtype else 4)
    assert measured / 1.5 < estimate < measured * 1.5


def test_estimate_scales_with_batch_precision_and_strategy():
    base = load_config(overrides=["model.n_layer=8", "model.n_embd=512", "train.num_workers=4", "train.optimizer=adamw"])
    est = estimate_memory(base)
    assert est.weights == est.optimizer == 16 * est.params // 2  # fp32 weights+grads, AdamW's two moments
    muon = estimate_memory(base.model_copy(update={"train": base.train.model_copy(update={"optimizer": "muon"})}))
    assert est.optimizer / 2 < muon.optimizer < est.optimizer  # one momentum for the blocks' weights, not two
    doubled = estimate_memory(base.model_copy(update={"train": base.train.model_copy(update={"batch_size": 32})}))
    assert doubled.activations == 2 * est.activations
    bf16 = estimate_memory(base.model_copy(update={"train": base.train.model_copy(update={"precision": "bf16"})}))
    assert bf16.precision == "bf16" and bf16.activations < 0.75 * est.activations
    fsdp = estimate_memory(base.model_copy(update={"train": base.train.model_copy(update={"strategy": "fsdp"})}))
    assert est.optimizer / 4 <= fsdp.optimizer < est.optimizer / 4 + 8
    assert est.weights / 4 < fsdp.weights < est.weights / 2  # a quarter, plus one gathered block


def test_huge_model_is_refused_naming_keys_estimate_and_limit():
    cfg = load_config(overrides=["model.n_embd=1000000000"])
    with pytest.raises(UserError) as err:
        check_memory(cfg, WorkerBudget(16 * GiB, "16 GiB RAM of this machine"))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model: training needs about ")
    assert "PiB per worker" in msg and "each worker has about 16 GiB" in msg
    assert "model.n_embd" in msg and "n_embd=1000000000" in msg


def test_huge_batch_names_the_batch_first():
    cfg = load_config(overrides=["train.batch_size=100000"])
    with pytest.raises(UserError, match=r"lower train\.batch_size or model\.block_size"):
        check_memory(cfg, WorkerBudget(8 * GiB, "8 GiB"))


def test_the_default_config_fits_and_an_unknown_budget_is_not_checked():
    cfg = load_config()
    assert check_memory(cfg, WorkerBudget(1 * GiB, "1 GiB")).total < 0.25 * GiB
    check_memory(load_config(overrides=["model.n_embd=1000000000"]), WorkerBudget(None, "unknown"))


@pytest.mark.parametrize("overrides, ram, gpus, expected", [
    ([], 32 * GiB, None, 32 * GiB),
    (["train.num_workers=2"], 32 * GiB, None, 16 * GiB),  # a local Ray: all on this machine
    (["train.num_workers=2", "train.ray_address=auto"], 32 * GiB, None, 32 * GiB),  # one per node
    (["train.num_workers=2", "train.ray_address=auto", "train.placement_strategy=STRICT_PACK"], 32 * GiB, None,
     16 * GiB),
    (["train.use_gpu=true", "train.num_workers=2"], 32 * GiB, [80 * GiB, 40 * GiB], 40 * GiB),
    (["train.use_gpu=true", "train.ray_address=auto"], 32 * GiB, [], None),  # a GPU cluster seen from a CPU head
])
def test_worker_budget(overrides, ram, gpus, expected):
    assert worker_budget(load_config(overrides=overrides), ram=ram, gpus=gpus).bytes == expected


@pytest.mark.parametrize("overrides, cpus, gpus, key", [
    (["train.num_workers=3"], 2, 0, "train.num_workers"),
    (["train.cpus_per_worker=4"], 2, 0, "train.cpus_per_worker"),
    (["train.use_gpu=true", "train.num_workers=2"], 16, 1, "train.use_gpu"),
])
def test_workers_a_local_ray_cannot_place_are_refused(overrides, cpus, gpus, key):
    with pytest.raises(UserError) as err:
        check_resources(load_config(overrides=overrides), cpus=cpus, gpus=gpus)
    assert str(err.value).startswith(f"{key}: ") and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides", [["train.num_workers=2"], ["train.num_workers=8", "train.ray_address=auto"],
                                       ["train.use_gpu=true", "train.num_workers=2"]])
def test_workers_that_fit_or_a_cluster_pass(overrides):
    check_resources(load_config(overrides=overrides), cpus=2, gpus=2)


def test_default_config_passes_on_this_machine():
    assert check_before_run(load_config()).params > 0


# --------------------------------------------------------------------------------------- the CLI
BAD_INPUTS = [
    (["model.n_embd=1000000000"], ["model.n_embd", "per worker", "each worker has about"]),
    (["registry.model_name=team/lm"], ["registry.model_name", "team/lm"]),
    (["registry.experiment="], ["registry.experiment", "empty"]),
    (["eval.max_tokens=64"], ["eval.max_tokens", "model.block_size=128"]),
]


def _check_refused(err: str, needles: list[str], workdir: Path) -> None:
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert all(n in err for n in needles), err
    assert not workdir.exists()  # nothing prepared, no Ray results, no MLflow store


@pytest.mark.parametrize("overrides, needles", BAD_INPUTS)
def test_cli_refuses_before_any_work(tmp_path: Path, overrides, needles, capsys, monkeypatch):
    from flows.__main__ import main

    monkeypatch.chdir(tmp_path)
    workdir = tmp_path / "wd"
    args = ["run", "--set", f"workdir={workdir}"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    _check_refused(capsys.readouterr().err, needles, workdir)
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.mark.slow  # a fresh interpreter each: what a user's shell sees
@pytest.mark.parametrize("overrides, needles", BAD_INPUTS)
def test_cli_subprocess_refuses_before_any_work(tmp_path: Path, overrides, needles):
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    workdir = tmp_path / "wd"
    args = ["run", "--set", f"workdir={workdir}"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "flows", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""  # no server, flow-run or Ray chatter: nothing started
    _check_refused(proc.stderr, needles, workdir)


@pytest.mark.parametrize("visible, expected", [
    (None, [80, 40]), ("1", [40]), ("", []), ("0,7", [80]), ("GPU-1234,GPU-5678", [80, 40]),
])
def test_visible_gpus_follow_cuda_visible_devices(visible, expected):
    from flows.preflight import visible_gpus

    assert visible_gpus("81920\n40960\n", visible) == [g * GiB for g in expected]


@pytest.mark.parametrize("pos, refused", [("rope", True), ("learned", False)])
def test_generation_kv_cache_must_fit(pos, refused):
    from flows.preflight import check_generation

    if refused:  # a RoPE model whose context allows that many new tokens (the generation limit does)
        cfg = load_config(overrides=["model.pos=rope", "model.block_size=1000000000",
                                     "eval.max_new_tokens=1000000000"])
        with pytest.raises(UserError, match=r"^eval\.max_new_tokens: 1000000000 tokens per sample need a KV cache "
                                            r"of about 3\.73 TiB .* but this machine has 16 GiB"):
            check_generation(cfg, ram=16 * GiB)
    else:  # learned positions: the cache slides over block_size positions
        cfg = load_config(overrides=["model.pos=learned", "eval.max_new_tokens=1000"])
        assert check_generation(cfg, ram=16 * GiB) == 2 * 4 * 128 * 128 * 4


def test_eval_max_new_tokens_above_the_generation_limit_is_refused_before_training():
    from flows.config import load_config
    from flows.preflight import check_generation

    cfg = load_config(overrides=["eval.max_new_tokens=5000", "model.block_size=128"])
    with pytest.raises(UserError, match=r"eval\.max_new_tokens: 5000 is above the generation limit of 1024"):
        check_generation(cfg)
    check_generation(load_config(overrides=["eval.max_new_tokens=1024"]))  # at the limit: fine
