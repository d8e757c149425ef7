"""Divergence on real components: a pipeline whose loss really goes NaN, and the gate against a NaN champion.

The pipeline runs on a local Ray (two DDP workers), the Prefect test harness and MLflow on SQLite with
AdamW at a learning rate of 1e6 and no clipping, which turns the loss and gradient norm of a tiny model NaN
within three steps on CPU. The gate tests use a real SQLite store and a model whose weights are all NaN, the kind
of champion the gate used to promote when there was none before it.
"""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path

import pytest

from flows.config import load_config
from flows.evaluate import EvalResult

pytestmark = pytest.mark.integration

DIVERGES = [
    "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
    "train.max_steps=6", "train.batch_size=4", "train.eval_interval=3", "train.eval_batches=1",
    "train.log_interval=1", "train.checkpoint_interval=3", "train.warmup_steps=0",
    "train.optimizer=adamw", "train.lr=1e6", "train.grad_clip=0", "train.num_workers=2",  # (Muon's steps are bounded)
    "eval.max_tokens=2048", "eval.max_new_tokens=8",
]
ONE_LINE = re.compile(r"training diverged at step (\d+): loss \S+, grad norm \S+ "
                      r"\(last finite loss \d+\.\d{4} at step (\d+)\); "
                      r"lower train\.lr \(now 1e\+06\) or set train\.grad_clip \(now 0: off\)")


def test_a_diverging_run_stops_at_the_step_fails_the_flow_and_registers_nothing(tmp_path: Path, prefect_harness,
                                                                                ray_local):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.errors import UserError
    from flows.pipeline import training_pipeline_flow

    cfg = load_config(overrides=[f"workdir={tmp_path}", *DIVERGES])
    state = training_pipeline_flow(config=cfg, return_state=True)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, UserError)  # the one error type nobody retries
    line = ONE_LINE.fullmatch(str(error))
    assert line, str(error)
    step = int(line[1])  # 2 or 3 on CPU, depending on the data
    assert int(line[2]) == step - 1 and 2 <= step < cfg.train.max_steps

    client = MlflowClient(cfg.tracking_uri())
    [run] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_model_versions(f"name='{cfg.registry.model_name}'") == []
    assert "eval_bits_per_byte" not in run.data.metrics  # evaluation never ran
    # Each step up to the divergent one logged once (a Ray retry would have logged step 1 again), finite
    # until the last, and nothing after it: training stopped there.
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    norms = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "grad_norm"))
    assert [s for s, _ in losses] == [s for s, _ in norms] == list(range(1, step + 1))
    assert all(math.isfinite(v) for _, v in losses[:-1] + norms[:-1]) and not math.isfinite(norms[-1][1])

    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    train_runs = [t for t in task_runs if t.name.startswith("train_model")]
    assert [(t.run_count, t.state.type.value) for t in train_runs] == [(1, "FAILED")]  # not retried
    assert not [t for t in task_runs if t.name.startswith(("evaluate_model", "register_model"))]


# --------------------------------------------------------------------------------------- the gate
CORPUS_A = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))
CORPUS_B = "".join(f"To be, or not to be: that is the question {i}.\n" for i in range(120))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def nan_checkpoint(tmp_path: Path, vocab_size: int) -> Path:
    """A Ray-Train-style checkpoint of a tiny model whose every weight is NaN (a diverged run's)."""
    import torch

    from attention_core import ModelConfig, TrainState, Transformer

    model = Transformer(ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(math.nan)
    path = tmp_path / "checkpoint_00000002"
    TrainState(model=model, optimizer=None, step=2).save(path)
    return path


def claimed(bpb: float) -> EvalResult:
    return EvalResult(val_loss=bpb, perplexity=math.exp(min(bpb, 50.0)), bits_per_byte=bpb, tokens=160,
                      bytes=160, windows=10, block_size=16, samples=[])


def register(cfg, uri, data, checkpoint, result, *, gate: bool = True):
    from flows.registry import champion_gate, log_model_version, start_pipeline_run

    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="divergence-gate")
    version = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=result)
    return version, (champion_gate(cfg, uri, version, data=data, result=result) if gate else None)


def champion_of(uri, name):
    from flows.registry import mlflow_client
    from flows.registry.gate import current_champion

    champion = current_champion(mlflow_client(uri), name)
    return None if champion is None else int(champion.version)


def test_a_non_finite_challenger_is_never_promoted_even_without_a_champion(store, prepared_corpus, tmp_path):
    cfg, data = prepared_corpus(CORPUS_A)
    cfg.registry.model_name = "divergence-no-champion"
    _, reg = register(cfg, store, data, nan_checkpoint(tmp_path, data.vocab_size), claimed(math.nan))
    assert (reg.champion, reg.decision) == (False, "kept champion")
    assert reg.method == "no champion; challenger's bits per byte is nan, not finite: never promoted"
    assert champion_of(store, cfg.registry.model_name) is None


def test_a_nan_champion_is_replaced_by_a_finite_challenger_on_re_evaluation(store, prepared_corpus, tiny_checkpoint,
                                                                           tmp_path):
    from flows.registry import CHAMPION, mlflow_client

    cfg, data = prepared_corpus(CORPUS_A)
    name = cfg.registry.model_name = "divergence-nan-champion"
    # A NaN champion, as the gate before this fix promoted one when there was no champion yet.
    nan_version, _ = register(cfg, store, data, nan_checkpoint(tmp_path, data.vocab_size), claimed(math.nan),
                              gate=False)
    mlflow_client(store).set_registered_model_alias(name, CHAMPION, nan_version.version)

    # The challenger claims a poor score on purpose: any finite one replaces a NaN champion.
    _, reg = register(cfg, store, data, tiny_checkpoint(data.vocab_size, seed=11), claimed(50.0))
    assert reg.champion and reg.champion_version == int(nan_version.version)
    assert math.isnan(reg.champion_bits_per_byte)  # measured again, on the same windows: still NaN
    assert reg.method == ("re-evaluated champion on the same validation split; "
                          "champion's bits per byte is nan, not finite: replaced")
    assert champion_of(store, name) == int(reg.version)
    tags = mlflow_client(store).get_model_version(name, reg.version).tags
    assert tags["gate.decision"] == "promoted" and tags["gate.method"] == reg.method


def test_a_nan_champion_is_replaced_on_recorded_scores_when_the_tokenizers_differ(store, prepared_corpus,
                                                                                tiny_checkpoint, tmp_path):
    from flows.registry import CHAMPION, mlflow_client

    cfg_a, data_a = prepared_corpus(CORPUS_A)
    cfg_b, data_b = prepared_corpus(CORPUS_B)
    name = cfg_a.registry.model_name = cfg_b.registry.model_name = "divergence-nan-recorded"
    nan_version, _ = register(cfg_a, store, data_a, nan_checkpoint(tmp_path, data_a.vocab_size), claimed(math.nan),
                              gate=False)
    mlflow_client(store).set_registered_model_alias(name, CHAMPION, nan_version.version)

    # A non-finite challenger does not replace it either ...
    _, worse = register(cfg_b, store, data_b, nan_checkpoint(tmp_path / "b", data_b.vocab_size),
                        claimed(math.inf))
    assert not worse.champion
    assert worse.method == ("recorded bits per byte (the tokenizers differ); "
                            "challenger's bits per byte is inf, not finite: never promoted")
    # ... a finite one does.
    _, better = register(cfg_b, store, data_b, tiny_checkpoint(data_b.vocab_size, seed=12), claimed(50.0))
    assert better.champion and math.isnan(better.champion_bits_per_byte)
    assert better.method == ("recorded bits per byte (the tokenizers differ); "
                             "champion's bits per byte is nan, not finite: replaced")
    assert champion_of(store, name) == int(better.version)
