"""Stage timings (flows/timing.py): what a clock adds up, held stages handed over once, the summary's table."""

from __future__ import annotations

import math

from flows import timing
from flows.evaluate import EvalResult, nanogpt_num_params
from flows.registry import Registration, summary_markdown


def test_clock_sums_every_entry_and_laps_continue_from_the_last_mark(monkeypatch):
    now = iter([0.0, 1.0, 3.0, 3.5, 10.0, 10.25, 12.0])
    monkeypatch.setattr(timing, "_now", lambda: next(now))  # not time.perf_counter: other threads read that
    clock = timing.StageClock()  # starts at 0.0
    clock.lap("setup")  # 1.0
    clock.lap("training")  # 3.0
    clock.lap("training")  # 3.5
    with clock.stage("checkpoints"):  # 10.0 .. 10.25: a block does not move the lap mark
        pass
    clock.lap("training")  # 12.0: 8.5 s since the last lap
    assert clock.seconds == {"setup": 1.0, "training": 11.0, "checkpoints": 0.25}
    assert clock.metrics(["setup"]) == {"stage_seconds.setup": 1.0}
    assert set(clock.metrics()) == {"stage_seconds.setup", "stage_seconds.training", "stage_seconds.checkpoints"}


def test_held_stages_are_taken_once_with_the_cli_stages_by_the_first_flow_run():
    timing.take_held("a"), timing.take_held("b")  # nothing left over from another test
    timing.hold("startup", 2.0)  # the CLI's, before any flow run
    timing.hold("prep", 1.0, "a")
    timing.hold("prep", 0.5, "a")
    timing.hold("prep", 4.0, "b")
    assert timing.take_held("a") == {"stage_seconds.startup": 2.0, "stage_seconds.prep": 1.5}
    assert timing.take_held("a") == {}
    assert timing.take_held("b") == {"stage_seconds.prep": 4.0}


def test_a_stage_closed_without_being_opened_records_nothing():
    timing.take_held("c")
    timing.close_stage("flow_start", "c")  # a flow run that no CLI started
    assert timing.take_held("c") == {}
    timing.open_stage("flow_start")
    timing.close_stage("flow_start", "c")
    assert set(timing.take_held("c")) == {"stage_seconds.flow_start"}


def test_stages_come_back_in_pipeline_order_and_the_table_sums_them():
    metrics = {"stage_seconds.gate": 0.5, "val_loss": 2.0, "stage_seconds.startup": 3.0,
               "stage_seconds.something_new": 1.0, "stage_seconds.ray_start": 1.5}
    stages = timing.stage_seconds(metrics)
    assert list(stages) == ["startup", "ray_start", "gate", "something_new"]
    table = timing.stage_table(stages)
    assert table[2].startswith("| startup | 3.00 | the CLI")
    assert table[-1] == "| **sum** | **6.00** | |"
    assert all(name in timing.STAGES for name in list(stages)[:3])


def test_summary_shows_the_stage_table_and_the_parameter_count():
    result = EvalResult(val_loss=1.5, perplexity=math.exp(1.5), bits_per_byte=2.25, tokens=4096, bytes=4200,
                        windows=128, block_size=32, samples=[], num_params=795_904)
    reg = Registration(model_name="m", version="1", model_uri="models:/m/1", champion=True, decision="promoted",
                       method="first version", challenger_bits_per_byte=2.25, run_id="r1", experiment_id="1")
    md = summary_markdown(reg, result, url="u", lineage={}, stages={"ray_start": 1.25, "gate": 0.5})
    assert "| 795,904 |" in md
    assert "## Stage times" in md and "| ray_start | 1.25 |" in md and "| **sum** | **1.75** | |" in md
    assert "Stage times" not in summary_markdown(reg, result, url="u", lineage={})


def test_nanogpt_parameter_count_leaves_out_only_the_position_embeddings():
    from attention_core import ModelConfig, Transformer

    # nanoGPT's shakespeare-char CPU model: it prints "number of parameters: 0.80M"
    model = Transformer(ModelConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128))
    assert nanogpt_num_params(model) == sum(p.numel() for p in model.parameters()) - 64 * 128 == 795_904
    tiny = dict(vocab_size=65, block_size=64, n_layer=1, n_head=2, n_embd=16)
    rope = Transformer(ModelConfig(**tiny, pos="rope"))  # no position embeddings: every parameter
    assert nanogpt_num_params(rope) == sum(p.numel() for p in rope.parameters())
    untied = Transformer(ModelConfig(**tiny, tie_embeddings=False))  # the token embedding and the head
    assert nanogpt_num_params(untied) == sum(p.numel() for p in untied.parameters()) - 64 * 16
    assert nanogpt_num_params(untied) - nanogpt_num_params(Transformer(ModelConfig(**tiny))) == 65 * 16
