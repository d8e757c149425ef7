"""The champion/challenger gate on a real MLflow store (SQLite): no Ray, no Prefect, tiny random models.

The challenger's own numbers are given (an EvalResult), the champion's are measured by the gate, so
each test decides which side wins without training anything.
"""

from __future__ import annotations

import math
import uuid

import pytest

from flows.evaluate import EvalResult, score_split
from flows.registry import (
    CHALLENGER,
    CHAMPION,
    champion_gate,
    log_model_version,
    mlflow_client,
    start_pipeline_run,
)

pytestmark = pytest.mark.integration

CORPUS_A = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120))
CORPUS_B = "".join(f"To be, or not to be: that is the question {i}.\n" for i in range(120))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def true_score(checkpoint, data, cfg):
    from flows.modelpack import export_model_pack, load_model_pack

    model, tok = load_model_pack(export_model_pack(checkpoint, data.path, checkpoint.parent / "pack"))
    return score_split(model, tok, data.tokens("val"), block_size=model.config.block_size,
                       batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)


def claimed(bpb: float) -> EvalResult:
    """What the challenger's own evaluation reported (the gate takes it as given)."""
    return EvalResult(val_loss=bpb, perplexity=math.exp(bpb), bits_per_byte=bpb, tokens=160, bytes=160,
                      windows=10, block_size=16, samples=[])


def register(cfg, uri, data, checkpoint, result):
    run_id = start_pipeline_run(cfg, uri, flow_run_id=str(uuid.uuid4()), run_name="gate-test")
    version = log_model_version(cfg, uri, run_id, checkpoint_path=str(checkpoint), data=data, result=result)
    return run_id, version, champion_gate(cfg, uri, version, data=data, result=result)


def champions(uri, name) -> list[int]:
    return [int(v.version) for v in mlflow_client(uri).search_model_versions(f"name='{name}'")
            if CHAMPION in mlflow_client(uri).get_model_version(name, v.version).aliases]


def test_gate_re_evaluates_the_champion_when_the_tokenizer_matches(store, prepared_corpus, tiny_checkpoint):
    cfg, data = prepared_corpus(CORPUS_A)
    cfg.registry.model_name = "gate-same-tokenizer"
    name, client = cfg.registry.model_name, mlflow_client(store)
    ck1, ck2, ck3 = (tiny_checkpoint(data.vocab_size, seed=s) for s in (1, 2, 3))
    s1, s2 = true_score(ck1, data, cfg), true_score(ck2, data, cfg)

    _, v1, reg1 = register(cfg, store, data, ck1, claimed(s1.bits_per_byte))
    assert (reg1.version, reg1.champion, reg1.method) == ("1", True, "no champion")

    # A challenger that claims to beat v1: the gate measures v1 itself on the same windows.
    run2, v2, reg2 = register(cfg, store, data, ck2, claimed(s1.bits_per_byte - 0.5))
    assert reg2.champion and reg2.method == "re-evaluated champion on the same validation split"
    assert reg2.champion_version == 1
    assert reg2.champion_bits_per_byte == pytest.approx(s1.bits_per_byte, rel=1e-6)
    tags = client.get_model_version(name, 2).tags
    assert tags["gate.decision"] == "promoted"
    assert float(tags["gate.champion_bits_per_byte"]) == pytest.approx(s1.bits_per_byte, rel=1e-6)
    assert float(tags["gate.challenger_bits_per_byte"]) == pytest.approx(s1.bits_per_byte - 0.5)
    assert client.get_run(run2).data.tags["gate.decision"] == "promoted"

    # One that is worse than v2 as measured: champion stays, challenger moves.
    _, v3, reg3 = register(cfg, store, data, ck3, claimed(s2.bits_per_byte + 0.1))
    assert not reg3.champion and reg3.decision == "kept champion" and reg3.champion_version == 2
    assert client.get_model_version_by_alias(name, CHAMPION).version == 2
    assert client.get_model_version_by_alias(name, CHALLENGER).version == 3
    assert champions(store, name) == [2]

    # A retry of v3's registration: same version, same decision, nothing moves.
    again = log_model_version(cfg, store, v3.run_id, checkpoint_path=str(ck3), data=data,
                              result=claimed(s2.bits_per_byte + 0.1))
    assert again.version == v3.version
    assert champion_gate(cfg, store, again, data=data, result=claimed(s2.bits_per_byte + 0.1)) == reg3
    assert len(client.search_model_versions(f"name='{name}'")) == 3


def test_min_improvement_is_required(store, prepared_corpus, tiny_checkpoint):
    cfg, data = prepared_corpus(CORPUS_A)
    cfg.registry.model_name = "gate-margin"
    ck1, ck2 = tiny_checkpoint(data.vocab_size, seed=4), tiny_checkpoint(data.vocab_size, seed=5)
    s1 = true_score(ck1, data, cfg)
    register(cfg, store, data, ck1, claimed(s1.bits_per_byte))
    cfg.registry.min_improvement = 0.2
    _, _, small = register(cfg, store, data, ck2, claimed(s1.bits_per_byte - 0.1))
    assert not small.champion
    _, _, large = register(cfg, store, data, ck2, claimed(s1.bits_per_byte - 0.3))
    assert large.champion and large.version == "3"
    assert champions(store, cfg.registry.model_name) == [3]


def test_gate_compares_recorded_bits_per_byte_when_tokenizers_differ(store, prepared_corpus, tiny_checkpoint):
    cfg_a, data_a = prepared_corpus(CORPUS_A)
    cfg_b, data_b = prepared_corpus(CORPUS_B)
    for cfg in (cfg_a, cfg_b):
        cfg.registry.model_name = "gate-other-tokenizer"
    register(cfg_a, store, data_a, tiny_checkpoint(data_a.vocab_size, seed=6), claimed(3.0))
    _, _, worse = register(cfg_b, store, data_b, tiny_checkpoint(data_b.vocab_size, seed=7), claimed(3.5))
    assert not worse.champion
    assert worse.method == "recorded bits per byte (the tokenizers differ)"
    assert worse.champion_bits_per_byte == 3.0
    _, _, better = register(cfg_b, store, data_b, tiny_checkpoint(data_b.vocab_size, seed=8), claimed(2.5))
    assert better.champion and better.champion_version == 1
    assert champions(store, cfg_b.registry.model_name) == [3]


def test_a_recorded_decision_is_redone_when_the_champion_changed(store, prepared_corpus, tiny_checkpoint):
    cfg, data = prepared_corpus(CORPUS_A)
    cfg.registry.model_name = "gate-stale-decision"
    name, client = cfg.registry.model_name, mlflow_client(store)
    cks = [tiny_checkpoint(data.vocab_size, seed=s) for s in (9, 10, 11)]
    s0 = true_score(cks[0], data, cfg)
    register(cfg, store, data, cks[0], claimed(s0.bits_per_byte))
    _, v2, reg2 = register(cfg, store, data, cks[1], claimed(s0.bits_per_byte + 1.0))
    assert not reg2.champion
    # Meanwhile a third version took the crown (as another run would have, outside the lock).
    _, v3, _ = register(cfg, store, data, cks[2], claimed(-1.0))
    assert client.get_model_version_by_alias(name, CHAMPION).version == 3
    # v2's retry cannot reuse "kept champion v1": it decides again against v3.
    redo = champion_gate(cfg, store, v2, data=data, result=claimed(s0.bits_per_byte + 1.0))
    assert redo.champion_version == 3 and not redo.champion
    assert client.get_model_version(name, 2).tags["gate.champion_version"] == "3"
    assert champions(store, name) == [3]


def test_models_with_different_context_lengths_are_compared_on_windows_both_can_read(
        store, prepared_corpus, tiny_checkpoint):
    cfg, data = prepared_corpus(CORPUS_A)
    cfg.registry.model_name = "gate-block-size"
    champion = tiny_checkpoint(data.vocab_size, seed=12, block_size=8)
    challenger = tiny_checkpoint(data.vocab_size, seed=13, block_size=16)
    register(cfg, store, data, champion, claimed(true_score(champion, data, cfg).bits_per_byte))
    _, _, reg = register(cfg, store, data, challenger, claimed(0.0))  # its own, 16-token windows: not comparable

    def at_8(checkpoint):
        from flows.modelpack import export_model_pack, load_model_pack

        model, tok = load_model_pack(export_model_pack(checkpoint, data.path, checkpoint.parent / "pack8"))
        return score_split(model, tok, data.tokens("val"), block_size=8, batch_size=cfg.eval.batch_size).bits_per_byte

    assert reg.champion_bits_per_byte == pytest.approx(at_8(champion), rel=1e-6)
    assert reg.challenger_bits_per_byte == pytest.approx(at_8(challenger), rel=1e-6)  # re-scored, not 0.0
    assert reg.champion == (at_8(challenger) < at_8(champion))
