"""The Prefect cache of the prepare task (flows.data.cache): its key follows the content, and a flow run
resolves and hashes the corpus once for the key and the prep together, through a real Prefect run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flows.config import load_config
from flows.data import sources
from flows.data.cache import DataFingerprintCache, source_for_run
from tests.flows.test_data import make_docs, write_text_files
from tests.flows.test_data_sources import hashed  # noqa: F401 - a fixture


def test_data_cache_key_follows_the_content_fingerprint(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 50)
    policy = DataFingerprintCache()

    def key(*overrides):
        cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={corpus}", *overrides])
        return policy.compute_key(None, {"cfg": cfg, "source": source_for_run(cfg)}, {})

    first = key()
    assert first == key() and first.startswith("prepare_dataset-")
    assert key("train.max_steps=5") == first            # training settings do not touch the data
    assert key("data.val_fraction=0.2") != first         # tokenization settings do
    assert key("model.block_size=64") != first           # the corpus-size check depends on it
    assert key(f"workdir={tmp_path / 'other'}") != first  # the returned path does
    corpus.write_text("hello there\n" * 50)
    assert key() != first                                # and so does the content
    missing = load_config(overrides=["data.source=/no/such/file"])
    assert source_for_run(missing) is None
    assert policy.compute_key(None, {"cfg": missing, "source": None}, {}) is None


@pytest.mark.integration
def test_a_flow_run_lists_and_hashes_the_corpus_once(tmp_path: Path, prefect_harness, hashed: Counter,  # noqa: F811
                                                     monkeypatch):
    from prefect import flow

    from flows.pipeline import _prepare_dataset_cached

    listed: list[str] = []
    real_listing = sources._local_files

    def counting_listing(src):
        listed.append(src.spec)
        return real_listing(src)

    monkeypatch.setattr(sources, "_local_files", counting_listing)
    write_text_files(tmp_path / "corpus", make_docs(30))
    cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={tmp_path / 'corpus'}",
                                 "model.block_size=16"])

    @flow(name="prepare-only")
    def prepare_only(config):
        return _prepare_dataset_cached(config, return_state=True)

    cold = prepare_only(cfg)
    files = sorted(str(p) for p in (tmp_path / "corpus").iterdir())
    assert cold.name == "Completed" and not cold.result().reused
    assert sorted(hashed) == files and set(hashed.values()) == {1}  # the cache key and the prep: one hash
    assert listed == [cfg.data.source]
    warm = prepare_only(cfg)
    assert warm.name == "Cached" and warm.result() == cold.result()
    assert set(hashed.values()) == {2} and len(listed) == 2  # once per run
