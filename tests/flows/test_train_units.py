"""Unit tests of the worker loop's pieces that need no Ray cluster: batches, data staging, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.data import PreparedData
from flows.train import (
    TrainResult,
    local_checkpoint,
    localize_data,
    mix_seed,
    sample_batch,
    stage_data,
    staged_data_uri,
)


@pytest.fixture()
def tokens() -> np.ndarray:
    return np.arange(10_000, dtype=np.uint16) % 97


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batch_is_the_same_whatever_the_world_size(tokens, world):
    full_x, full_y = sample_batch(tokens, batch_size=8, block_size=16, seed=3, step=5)
    parts = [sample_batch(tokens, batch_size=8 // world, block_size=16, seed=3, step=5, rank=r, world_size=world)
             for r in range(world)]
    assert torch.equal(torch.cat([x for x, _ in parts]), full_x)
    assert torch.equal(torch.cat([y for _, y in parts]), full_y)


def test_batches_depend_on_step_and_micro_step_only(tokens):
    a = sample_batch(tokens, batch_size=4, block_size=8, seed=1, step=7, micro=1)
    b = sample_batch(tokens, batch_size=4, block_size=8, seed=1, step=7, micro=1)
    c = sample_batch(tokens, batch_size=4, block_size=8, seed=1, step=8, micro=1)
    d = sample_batch(tokens, batch_size=4, block_size=8, seed=1, step=7, micro=0)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])
    x, y = a
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one


def test_seed_mixing_is_deterministic_and_spread():
    seeds = {mix_seed(1337, step, rank) for step in range(100) for rank in range(4)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)
    assert mix_seed(1, 2, 3) == mix_seed(1, 2, 3)


def _prepared(tmp_path) -> PreparedData:
    d = tmp_path / "prepared" / "abc123"
    d.mkdir(parents=True)
    np.arange(100, dtype=np.uint16).tofile(d / "train.bin")
    np.arange(50, dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text("{}")
    (d / "tokenizer.json").write_text("{}")
    return PreparedData(path=str(d), fingerprint="abc123", tokenizer="char", vocab_size=100, dtype="uint16",
                        train_tokens=100, val_tokens=50, val_bytes=50)


@pytest.mark.parametrize("uri", [False, True])
def test_data_staged_under_storage_reaches_a_node_without_the_workdir(tmp_path, uri):
    data = _prepared(tmp_path)
    storage = (f"file://{tmp_path}/storage" if uri else str(tmp_path / "storage"))
    stage_data(data, storage)
    stage_data(data, storage)  # idempotent
    staged = staged_data_uri(str(tmp_path / "storage"), "abc123")
    assert sorted(p.name for p in Path(staged).iterdir()) == \
        ["_COMMITTED", "meta.json", "tokenizer.json", "train.bin", "val.bin"]

    elsewhere = data.model_copy(update={"path": str(tmp_path / "not-on-this-node")})
    local = localize_data(elsewhere, storage)
    assert local.path != elsewhere.path
    assert np.array_equal(local.tokens("train"), data.tokens("train"))
    assert localize_data(data, storage).path == data.path  # visible locally: used as is


def test_local_checkpoint_reads_a_checkpoint_from_a_uri_storage(tmp_path):
    ckpt = tmp_path / "runs" / "r" / "checkpoint_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text('{"step": 4}')
    result = TrainResult(checkpoint_path=str(ckpt), run_name="r", storage_path=f"file://{tmp_path}/runs",
                         metrics={})
    with local_checkpoint(result) as d:
        assert (Path(d) / "state.json").read_text() == '{"step": 4}'


def test_a_split_of_exactly_one_window_samples_it():
    # prep accepts a split of block_size + 1 tokens; the sampler must too (it drew from an empty range)
    tokens = np.arange(17, dtype=np.uint16)
    x, y = sample_batch(tokens, batch_size=3, block_size=16, seed=0, step=0)
    assert x.tolist() == [list(range(16))] * 3 and y.tolist() == [list(range(1, 17))] * 3


def test_a_copy_staged_before_commit_markers_is_adopted_only_when_it_holds_the_prepared_files(tmp_path):
    import shutil

    from flows.train.staging import COMMITTED

    data = _prepared(tmp_path)
    storage = tmp_path / "storage"
    staged = Path(staged_data_uri(str(storage), data.fingerprint))
    shutil.copytree(data.path, staged)  # what staging wrote before markers: the whole copy, no marker
    stage_data(data, str(storage))
    assert (staged / COMMITTED).is_file()

    (staged / COMMITTED).unlink()
    (staged / "train.bin").write_bytes(b"\0")  # not this dataset's files: refused, never committed
    with pytest.raises(OSError, match="not a staged copy of this dataset"):
        stage_data(data, str(storage))
    assert not (staged / COMMITTED).exists()
