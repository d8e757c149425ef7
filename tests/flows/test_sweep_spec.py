"""The sweep's specs and settings: parsed by each key's type, refused in one line before anything runs."""

from __future__ import annotations

import math

import pytest

from flows.config import PipelineConfig, load_config
from flows.errors import UserError
from flows.sweep.spec import SweepConfig, check_sweep, load_sweep, parse_dimension, sweep_name, trial_config, \
    tune_space


@pytest.mark.parametrize("key, spec, kind, values, low, high", [
    ("train.lr", "loguniform:1e-4:1e-2", "loguniform", [], 1e-4, 1e-2),
    ("train.weight_decay", "uniform:0:0.2", "uniform", [], 0.0, 0.2),
    ("model.n_layer", "int:1:4", "int", [], 1, 4),
    ("model.n_embd", "choice:64,128", "choice", [64, 128], None, None),
    ("train.optimizer", "choice:adamw,muon", "choice", ["adamw", "muon"], None, None),
    ("model.bias", "choice:true,false", "choice", [True, False], None, None),
    ("train.lr", "choice:3e-3, 1e-3", "choice", [3e-3, 1e-3], None, None),
])
def test_specs_parse_by_the_keys_type(key, spec, kind, values, low, high):
    dim = parse_dimension(key, spec)
    assert (dim.kind, dim.values, dim.low, dim.high) == (kind, values, low, high)


@pytest.mark.parametrize("key, spec, names", [
    ("train.lr", "gaussian:0:1", "unknown kind 'gaussian'"),
    ("train.lrr", "uniform:0:1", "unknown config key 'train.lrr'"),
    ("data.tokenizer", "choice:char,byte", "the data is prepared once for all trials"),
    ("registry.model_name", "choice:a,b", "only the best trial is registered"),
    ("train.run_name", "choice:a,b", "each trial's Ray Train run is named by the sweep"),
    ("model.n_layer", "uniform:1:4", "use int:LO:HI"),
    ("train.optimizer", "uniform:0:1", "train.optimizer is not"),
    ("train.lr", "loguniform:0:1e-2", "loguniform needs LO > 0"),
    ("train.lr", "uniform:1e-2:1e-4", "LO must be below HI"),
    ("train.lr", "uniform:a:b", "LO and HI must be numbers"),
    ("model.n_layer", "int:1.5:4", "LO and HI must be integers"),
    ("train.lr", "uniform:1e-3", "uniform needs LO:HI"),
    ("train.lr", "choice:", "choice needs values"),
    ("model.n_embd", "choice:64,abc", "'abc' is not a valid int"),
])
def test_bad_specs_name_the_key_and_the_spec(key, spec, names):
    with pytest.raises(UserError, match=f"--search {key}") as err:
        parse_dimension(key, spec)
    assert names in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("search, names", [
    ({"model.n_embd": "choice:64,90"}, "90 makes an invalid config"),  # 90 is not divisible by n_head=4
    ({"train.lr": "loguniform:1e-6:1e-2"}, "train.min_lr"),  # the lowest lr is below the base min_lr
    ({"train.optimizer": "choice:adamw,sgd"}, "train.optimizer"),
])
def test_each_value_is_checked_against_the_base_config(search, names):
    with pytest.raises(UserError, match="makes an invalid config") as err:
        check_sweep(PipelineConfig(), SweepConfig(search=search))
    assert names in str(err.value)


def test_nothing_to_search_and_a_grace_period_past_the_end_are_refused():
    with pytest.raises(UserError, match="nothing to search"):
        check_sweep(PipelineConfig(), SweepConfig())
    cfg = load_config(overrides=["train.max_steps=100"])
    with pytest.raises(UserError, match="sweep.grace_period: 100 steps"):
        check_sweep(cfg, SweepConfig(search={"train.lr": "uniform:1e-3:2e-3"}, grace_period=100))


def test_the_config_files_sweep_section_and_the_command_line_merge(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("train: {max_steps: 50}\nsweep:\n  search: {train.lr: 'loguniform:1e-4:1e-2'}\n  trials: 3\n")
    cfg = load_config(path)  # `run` reads the same file: its sweep section is the sweep's only
    assert cfg.train.max_steps == 50
    sweep = load_sweep(str(path), ["model.n_embd=choice:64,128"], trials=None, scheduler="fifo")
    assert sweep.search == {"train.lr": "loguniform:1e-4:1e-2", "model.n_embd": "choice:64,128"}
    assert (sweep.trials, sweep.scheduler) == (3, "fifo")
    path.write_text("sweep: {trails: 3}\n")
    with pytest.raises(UserError, match="unknown sweep key 'sweep.trails'"):
        load_sweep(str(path), [])
    with pytest.raises(UserError, match="expects KEY=SPEC"):
        load_sweep(None, ["train.lr"])


def test_a_sweep_is_named_by_what_it_trains_so_the_same_command_resumes_it():
    base, sweep = PipelineConfig(), SweepConfig(search={"train.lr": "uniform:1e-3:2e-3"})
    assert sweep_name(base, sweep) == sweep_name(PipelineConfig(), SweepConfig(search={"train.lr": "uniform:1e-3:2e-3"}))
    assert sweep_name(base, sweep) == sweep_name(base, sweep.model_copy(update={"max_concurrent": 4}))
    assert sweep_name(base, sweep) != sweep_name(base, sweep.model_copy(update={"trials": 9}))
    assert sweep_name(base, sweep) != sweep_name(load_config(overrides=["train.max_steps=7"]), sweep)
    assert sweep_name(base, sweep.model_copy(update={"name": "mine"})) == "mine"


def test_a_trial_is_the_base_config_with_its_values():
    cfg = trial_config(PipelineConfig(), {"train.lr": 2e-3, "model.n_embd": 64})
    assert (cfg.train.lr, cfg.model.n_embd, cfg.model.n_layer) == (2e-3, 64, PipelineConfig().model.n_layer)


def test_tune_space_samples_inside_every_range_both_int_ends_included():
    import random

    dims = check_sweep(PipelineConfig(), SweepConfig(search={
        "train.lr": "loguniform:3e-4:1e-2", "model.n_layer": "int:1:2", "model.n_embd": "choice:64,128"}))
    space = tune_space(dims)
    random.seed(0)
    draws = [{k: d.sample() for k, d in space.items()} for _ in range(200)]
    assert all(3e-4 <= x["train.lr"] <= 1e-2 for x in draws)
    assert {x["model.n_layer"] for x in draws} == {1, 2}
    assert {x["model.n_embd"] for x in draws} == {64, 128}
    assert min(math.log10(x["train.lr"]) for x in draws) < -3.2  # log-uniform: the low decade is sampled


def test_optuna_suggests_trials_inside_the_space():
    """The optuna extra through Ray Tune's OptunaSearch: real suggestions, no cluster needed."""
    from flows.sweep.tuner import _searcher

    dims = check_sweep(PipelineConfig(), SweepConfig(search={"train.lr": "loguniform:3e-4:1e-2",
                                                              "model.n_embd": "choice:64,128"}))
    searcher = _searcher(SweepConfig(search={"x": "y"}, searcher="optuna", seed=3), concurrent=2)
    assert searcher.set_search_properties("val_loss", "min", tune_space(dims))
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        assert 3e-4 <= config["train.lr"] <= 1e-2 and config["model.n_embd"] in (64, 128)
        searcher.on_trial_complete(f"t{i}", {"val_loss": 2.0 - i, "training_iteration": 1})


@pytest.mark.parametrize("argv, names", [
    (["--search", "train.lr=gaussian:0:1"], "unknown kind 'gaussian'"),
    (["--search", "data.source=choice:a,b"], "cannot be searched"),
    (["--search", "train.lr=loguniform:1e-6:1e-2"], "train.min_lr"),
    ([], "nothing to search"),
])
def test_the_cli_refuses_bad_sweeps_in_one_line_with_exit_2(argv, names, capsys, tmp_path):
    from flows.__main__ import main

    assert main(["sweep", "--set", f"workdir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and names in err and err.count("\n") == 1
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()  # nothing ran


@pytest.mark.parametrize("trial_id, label", [
    ("5767e_00003", "trial 3: lr=2e-3,n_embd=64"),  # random search numbers its trials
    ("1164f087", "trial 1164f087: lr=2e-3,n_embd=64"),  # a searcher's (Optuna's) trials have hex ids
])
def test_trial_labels_name_the_trial_and_its_values(trial_id, label):
    from flows.sweep.trials import trial_label

    assert trial_label(trial_id, {"train.lr": 2e-3, "model.n_embd": 64}, ["train.lr", "model.n_embd"]) == label
