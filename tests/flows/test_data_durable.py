"""Prepared data is durable and checked (flows/data/integrity.py): meta.json records each file's size and
checksum, everything is fsynced before the rename that publishes it, and a published dataset whose files
no longer match meta.json is rebuilt with a warning naming the file, never reused; also when the flow's
Prefect cache would have handed the damaged dataset to training."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from flows.data import prepare_dataset
from flows.data import prepare as prepare_mod
from flows.data.integrity import CHECKSUM, FILES, file_checksum, verify_prepared
from tests.flows.test_data import config, make_docs, write_text_files


@pytest.fixture
def prepared(tmp_path: Path):
    """(cfg, data, the bytes of every file as prepared) of a small hash-split corpus."""
    docs = make_docs(300)
    write_text_files(tmp_path / "corpus", docs)
    cfg = config(tmp_path, tmp_path / "corpus")
    data = prepare_dataset(cfg)
    return cfg, data, {name: (Path(data.path) / name).read_bytes() for name in (*FILES, "meta.json")}


def test_meta_json_records_the_size_and_checksum_of_each_file(prepared):
    _, data, original = prepared
    files = json.loads(original["meta.json"])["files"]
    assert sorted(files) == sorted(FILES)
    for name in FILES:
        assert files[name]["bytes"] == len(original[name]) > 0
        assert files[name][CHECKSUM] == file_checksum(Path(data.path) / name)
    assert verify_prepared(Path(data.path)) is None


def _flip_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _drop_files_entry(path: Path) -> None:
    meta = json.loads(path.read_text())
    del meta["files"]
    path.write_text(json.dumps(meta))


DAMAGE = {
    "truncated train.bin": ("train.bin", lambda p: os.truncate(p, p.stat().st_size - 2), "has"),
    "a flipped byte in train.bin": ("train.bin", _flip_byte, "does not match its xxh3_128 checksum"),
    "a flipped byte in val.bin": ("val.bin", _flip_byte, "does not match its xxh3_128 checksum"),
    "tokenizer.json deleted": ("tokenizer.json", Path.unlink, "is missing"),
    "meta.json cut short": ("meta.json", lambda p: p.write_text(p.read_text()[:40]), "cannot be read"),
    "meta.json of an older version": ("meta.json", _drop_files_entry, "records no size and checksum"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_dataset_is_rebuilt_with_a_warning_naming_the_file(prepared, damage, caplog):
    cfg, data, original = prepared
    name, do, reason = DAMAGE[damage]
    do(Path(data.path) / name)
    assert verify_prepared(Path(data.path)) is not None

    with caplog.at_level(logging.WARNING, logger="flows.data.prepare"):
        again = prepare_dataset(cfg)

    assert not again.reused and again.path == data.path
    [warning] = [r for r in caplog.records if r.levelno >= logging.WARNING]
    message = warning.getMessage()
    assert "\n" not in message and str(Path(data.path) / name) in message and reason in message, message
    for split in ("train", "val"):  # the training data is the original again, bit for bit
        assert (Path(data.path) / f"{split}.bin").read_bytes() == original[f"{split}.bin"]
    assert np.array_equal(again.tokens("train"), np.frombuffer(original["train.bin"], dtype=data.dtype))
    assert verify_prepared(Path(data.path)) is None
    assert [p.name for p in Path(data.path).parent.iterdir() if not p.name.startswith(".check-")] == \
        [data.fingerprint]  # the damaged copy is gone with the prep's workspace
    caplog.clear()
    assert prepare_dataset(cfg).reused and not caplog.records  # and reused, silently, from now on


def test_files_and_directory_are_fsynced_before_the_rename_that_publishes_them(tmp_path, monkeypatch):
    write_text_files(tmp_path / "corpus", make_docs(40))
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", f"{src} -> {dst}"))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    data = prepare_dataset(config(tmp_path, tmp_path / "corpus"))

    out = Path(data.path)
    [publish] = [i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f" -> {out}")]
    staged = Path(events[publish][1].split(" -> ")[0])
    synced_before = {what for kind, what in events[:publish] if kind == "fsync"}
    assert {str(staged / name) for name in (*FILES, "meta.json")} | {str(staged)} <= synced_before
    assert ("fsync", str(out.parent)) in events[publish + 1:]  # the rename itself


def test_a_dataset_rebuilt_by_another_prep_meanwhile_is_reused(prepared, monkeypatch):
    """Two preps find the same damage: the second to take the check lock finds it rebuilt and keeps it."""
    cfg, data, _ = prepared
    _flip_byte(Path(data.path) / "train.bin")
    real_set_aside = prepare_mod._Workspace.set_aside
    other = {}

    def rebuilt_by_someone_else_first(self, out):
        monkeypatch.setattr(prepare_mod._Workspace, "set_aside", real_set_aside)
        other["data"] = prepare_dataset(cfg)
        return real_set_aside(self, out)

    monkeypatch.setattr(prepare_mod._Workspace, "set_aside", rebuilt_by_someone_else_first)
    data2 = prepare_dataset(cfg)
    assert not other["data"].reused and data2.reused and data2.path == data.path
    assert verify_prepared(Path(data.path)) is None


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.integration
def test_the_flow_does_not_take_its_cache_hit_on_a_damaged_dataset(tmp_path: Path, prefect_harness):
    from prefect import flow

    from flows.pipeline import _prepare_dataset_cached

    write_text_files(tmp_path / "corpus", make_docs(200))
    cfg = config(tmp_path, tmp_path / "corpus")

    @flow(name="prepare-only")
    def prepare_only(config):
        return _prepare_dataset_cached(config, return_state=True)

    first = prepare_only(cfg)
    data = first.result()
    train = Path(data.path) / "train.bin"
    original = train.read_bytes()
    assert prepare_only(cfg).name == "Cached"

    _flip_byte(train)  # same size: only the checksum tells
    warnings = _Records()
    logging.getLogger("flows.data.prepare").addHandler(warnings)  # Prefect's logging set-up replaces caplog's
    try:
        rebuilt = prepare_only(cfg)
    finally:
        logging.getLogger("flows.data.prepare").removeHandler(warnings)
    assert rebuilt.name == "Completed" and not rebuilt.result().reused
    assert train.read_bytes() == original
    assert [str(train) in r.getMessage() for r in warnings.records] == [True]
    assert prepare_only(cfg).name == "Cached"
