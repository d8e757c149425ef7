"""A reused train.run_name resumes only the training it was started with (flows/train/runs.py): what counts
as training settings, the file saved beside the run, and the one-line refusal naming the differing keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.config import TrainSection, load_config
from flows.errors import UserError
from flows.preflight import check_before_run
from flows.train.runs import (DERIVED_KEYS, OPERATIONAL_KEYS, RUN_FILE, TRAINING_KEYS, check_run_settings,
                              claim_run_settings, read_run_settings, training_settings)

BASE = ["model.n_layer=1", "model.n_head=2", "model.n_embd=16", "model.block_size=16", "train.run_name=r1"]


def cfg_with(tmp_path: Path, *overrides: str):
    return load_config(overrides=[f"workdir={tmp_path}", *BASE, *overrides])


def test_every_train_key_is_either_training_or_operational():
    """A new TrainSection field must be classified here: does changing it change what the model learns?"""
    keys = [*TRAINING_KEYS, *DERIVED_KEYS, *OPERATIONAL_KEYS]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(TrainSection.model_fields)


def test_first_start_saves_the_settings_and_the_same_settings_resume(tmp_path):
    cfg = cfg_with(tmp_path)
    storage = cfg.storage_path()
    claim_run_settings(cfg, storage, "r1", "fp1")
    saved = json.loads((Path(storage) / "r1" / RUN_FILE).read_text())
    assert saved["settings"] == training_settings(cfg, "fp1") == read_run_settings(storage, "r1")
    assert saved["settings"]["model.n_layer"] == 1 and saved["settings"]["data.fingerprint"] == "fp1"
    claim_run_settings(cfg, storage, "r1", "fp1")  # the same: resumes
    check_before_run(cfg)


@pytest.mark.parametrize("change, keys", [
    (["train.lr=1e-3"], ["train.lr"]),
    (["model.n_layer=2"], ["model.n_layer"]),
    (["train.max_steps=301", "train.seed=1"], ["train.max_steps", "train.seed"]),
    (["train.batch_size=8"], ["train.batch_size*num_workers"]),
    (["train.precision=bf16"], ["train.precision"]),
])
def test_a_change_that_changes_training_is_refused_naming_the_keys(tmp_path, change, keys):
    claim_run_settings(cfg_with(tmp_path), cfg_with(tmp_path).storage_path(), "r1", "fp1")
    changed = cfg_with(tmp_path, *change)
    for check in (lambda: check_before_run(changed),  # the CLI's preflight, before anything starts
                  lambda: claim_run_settings(changed, changed.storage_path(), "r1", "fp1")):  # the driver
        with pytest.raises(UserError) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and message.startswith("train.run_name: run 'r1' was started with other")
        named = message.split("(", 1)[1].split("; saved in")[0]
        assert sorted(part.split()[0] for part in named.split(", ")) == keys, message
    assert json.loads((Path(changed.storage_path()) / "r1" / RUN_FILE).read_text())["settings"]["train.lr"] == 2e-3


def test_other_data_is_refused_once_known(tmp_path):
    cfg = cfg_with(tmp_path)
    claim_run_settings(cfg, cfg.storage_path(), "r1", "fp1")
    check_run_settings(cfg)  # before the prep the data is not known: not compared
    with pytest.raises(UserError, match=r"data\.fingerprint \"fp1\" -> \"fp2\""):
        claim_run_settings(cfg, cfg.storage_path(), "r1", "fp2")


@pytest.mark.parametrize("change", [
    "train.log_interval=1", "train.eval_interval=7", "train.checkpoint_interval=3", "train.num_to_keep=9",
    "train.strategy=fsdp", "train.cpus_per_worker=1", "train.max_failures=0", "train.compile=true",
    "eval.max_new_tokens=5", "eval.prompts=[x]", "registry.model_name=other", "data.num_proc=1",
])
def test_a_change_that_does_not_change_training_resumes(tmp_path, change):
    same = ["train.optimizer=adamw"] if change == "train.strategy=fsdp" else []  # FSDP2 trains with AdamW only
    claim_run_settings(cfg_with(tmp_path, *same), cfg_with(tmp_path, *same).storage_path(), "r1", "fp1")
    changed = cfg_with(tmp_path, *same, change)
    check_before_run(changed)
    claim_run_settings(changed, changed.storage_path(), "r1", "fp1")


def test_fsdp_under_the_default_optimizer_is_another_optimizer(tmp_path):
    """Muon, the default, under ddp; AdamW under fsdp: resuming a ddp run with fsdp changes the optimizer."""
    claim_run_settings(cfg_with(tmp_path), cfg_with(tmp_path).storage_path(), "r1", "fp1")
    with pytest.raises(UserError, match=r"train\.optimizer \"muon\" -> \"adamw\""):
        check_before_run(cfg_with(tmp_path, "train.strategy=fsdp"))


def test_the_same_global_batch_over_other_workers_resumes(tmp_path):
    """2 workers x 4 windows sample what 1 worker x 8 does (flows/train/batches.py)."""
    one = cfg_with(tmp_path, "train.batch_size=8", "train.num_workers=1")
    claim_run_settings(one, one.storage_path(), "r1", "fp1")
    two = cfg_with(tmp_path, "train.batch_size=4", "train.num_workers=2")
    claim_run_settings(two, two.storage_path(), "r1", "fp1")


def test_an_unnamed_run_or_a_new_name_is_not_checked(tmp_path):
    claim_run_settings(cfg_with(tmp_path), cfg_with(tmp_path).storage_path(), "r1", "fp1")
    check_run_settings(cfg_with(tmp_path, "train.lr=1e-3", "train.run_name=null"))
    check_run_settings(cfg_with(tmp_path, "train.lr=1e-3", "train.run_name=r2"))


def test_an_unreadable_settings_file_is_one_line_naming_it(tmp_path):
    cfg = cfg_with(tmp_path)
    path = Path(cfg.storage_path()) / "r1" / RUN_FILE
    path.parent.mkdir(parents=True)
    path.write_text('{"settings": {"model.n_la')
    with pytest.raises(UserError, match=f"train.run_name: {path} cannot be read"):
        check_run_settings(cfg)
