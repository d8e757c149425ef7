"""Divergence, unit by unit: the worker's watch, evaluation's refusal, the gate's rules for non-finite scores.

The whole flow on a run that really diverges is tests/integration/test_divergence.py; here each piece
runs alone on tiny models in milliseconds, except the two-process DDP check (slow) that the watch's
verdict is the same on every rank when only one rank's loss goes non-finite.
"""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from attention_core import ModelConfig, Transformer
from flows.config import load_config
from flows.errors import UserError
from flows.evaluate import SplitScore, check_finite, evaluate_pack
from flows.registry.gate import _compare, decide
from flows.tokenizer import load_tokenizer
from flows.train.metrics import DivergenceWatch

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------------------- the watch
def test_watch_names_the_step_and_the_last_finite_loss():
    watch = DivergenceWatch(lr=1e6, grad_clip=0.0)
    assert watch.check(1, 4.1532, 0.75, global_loss=True) is None
    assert watch.check(2, 3.9, 12.0, global_loss=True) is None
    assert watch.check(3, NAN, NAN, global_loss=True) == (
        "training diverged at step 3: loss nan, grad norm nan (last finite loss 3.9000 at step 2); "
        "lower train.lr (now 1e+06) or set train.grad_clip (now 0: off)")


@pytest.mark.parametrize("loss, grad_norm", [(NAN, 1.0), (INF, 1.0), (2.0, NAN), (2.0, INF), (2.0, -INF)])
def test_watch_stops_on_any_non_finite_value(loss, grad_norm):
    watch = DivergenceWatch(lr=3e-3, grad_clip=1.0)
    message = watch.check(1, loss, grad_norm, global_loss=True)
    assert message is not None and "\n" not in message
    assert message.startswith("training diverged at step 1: ")
    assert message.endswith("(no finite loss before it); lower train.lr (now 0.003)")  # clipping already on


def test_a_local_loss_alone_does_not_decide_under_data_parallelism():
    # With several ranks a rank's own loss may differ from the others'; the norm (global) decides.
    watch = DivergenceWatch(lr=1.0, grad_clip=1.0)
    assert watch.check(5, NAN, 1.0, global_loss=False) is None
    assert watch.check(5, NAN, NAN, global_loss=False).startswith("training diverged at step 5: loss nan")


def test_after_a_resume_the_message_says_no_finite_loss_was_seen_since():
    watch = DivergenceWatch(lr=1.0, grad_clip=1.0, start_step=40)
    assert "(no finite loss since this attempt resumed at step 40)" in watch.check(41, NAN, NAN, global_loss=True)


# --------------------------------------------------------------------------------------- evaluation
TEXT = "the quick brown fox jumps over the lazy dog\n" * 12


def test_evaluation_refuses_a_model_whose_weights_diverged(tmp_path):
    from flows.data import prepare_dataset

    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = load_config(overrides=[f"workdir={tmp_path / 'wd'}", f"data.source={tmp_path / 'corpus.txt'}",
                                 "model.block_size=8", "eval.max_new_tokens=4", "eval.prompts=['the ']"])
    data = prepare_dataset(cfg)
    tok = load_tokenizer(Path(data.path) / "tokenizer.json")
    model = Transformer(ModelConfig(vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=8))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(NAN)
    with pytest.raises(UserError) as err:
        evaluate_pack(model, tok, data, cfg)
    message = str(err.value)
    assert message.startswith("evaluation: validation loss nan and bits per byte nan over ")
    assert "not finite" in message and "train.lr" in message and "\n" not in message


@pytest.mark.parametrize("nll", [NAN, INF])
def test_check_finite_refuses_a_non_finite_score(nll):
    with pytest.raises(UserError, match="not finite"):
        check_finite(SplitScore(nll=nll, tokens=16, bytes=16, windows=2, block_size=8))
    check_finite(SplitScore(nll=20.0, tokens=16, bytes=16, windows=2, block_size=8))  # a finite one passes


# --------------------------------------------------------------------------------------- the gate's rules
@pytest.mark.parametrize("challenger, champion, margin, promote, reason", [
    (2.0, 2.5, 0.0, True, None),
    (2.0, 2.5, 0.6, False, None),               # the margin still applies between finite scores
    (2.0, NAN, 0.0, True, "champion's bits per byte is nan, not finite: replaced"),
    (9.0, NAN, 5.0, True, "champion's bits per byte is nan, not finite: replaced"),  # any finite one
    (2.0, INF, 0.0, True, "champion's bits per byte is inf, not finite: replaced"),
    (2.0, -INF, 0.0, True, "champion's bits per byte is -inf, not finite: replaced"),
    (NAN, 2.5, 0.0, False, "challenger's bits per byte is nan, not finite: never promoted"),
    (-INF, 2.5, 0.0, False, "challenger's bits per byte is -inf, not finite: never promoted"),
    (NAN, NAN, 0.0, False, "challenger's bits per byte is nan, not finite: never promoted"),
])
def test_gate_rules_for_non_finite_scores(challenger, champion, margin, promote, reason):
    decided, method = _compare(challenger, champion, margin, "recorded bits per byte")
    assert decided is promote
    assert method == ("recorded bits per byte" if reason is None else f"recorded bits per byte; {reason}")


@pytest.mark.parametrize("bpb, promote", [(2.0, True), (NAN, False), (INF, False)])
def test_with_no_champion_only_a_finite_challenger_is_promoted(bpb, promote):
    from flows.evaluate import EvalResult

    cfg = load_config(overrides=[])
    result = EvalResult(val_loss=bpb, perplexity=bpb, bits_per_byte=bpb, tokens=16, bytes=16, windows=2,
                        block_size=8, samples=[])
    decision = decide(cfg, "sqlite:///unused.db", challenger=None, champion=None, data=None, result=result)
    assert decision.promote is promote
    assert decision.method == ("no champion" if promote
                               else f"no champion; challenger's bits per byte is {bpb}, not finite: never promoted")


# --------------------------------------------------------------------------------------- ranks agree
def _ddp_rank(rank: int, port: int, poisoned_step: int, verdicts) -> None:
    """One DDP rank of a tiny model; on `poisoned_step` rank 1's forward pass turns non-finite."""
    import torch.distributed as dist

    from attention_core import configure_optimizer, train_step

    # were the ranks to disagree, one would wait in the next all-reduce: fail then, not after 30 minutes
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(
            Transformer(ModelConfig(vocab_size=16, n_layer=1, n_head=2, n_embd=16, block_size=8)))
        optimizer = configure_optimizer(model.module, lr=1e-3, weight_decay=0.0)
        step = {"n": 0}

        def poison(module, args, output):  # a real NaN in one rank's activations, at one step only
            return output * NAN if rank == 1 and step["n"] == poisoned_step else output

        model.module.h[0].mlp.register_forward_hook(poison)
        watch = DivergenceWatch(lr=1e-3, grad_clip=1.0)
        g = torch.Generator().manual_seed(rank)
        for n in range(1, 6):
            step["n"] = n
            x, y = torch.randint(0, 16, (2, 8), generator=g), torch.randint(0, 16, (2, 8), generator=g)
            result = train_step(model, optimizer, [(x, y)], grad_clip=1.0)
            message = watch.check(n, result.loss, result.grad_norm, global_loss=False)
            if message:
                verdicts[rank] = (n, result.loss, message)
                return
        verdicts[rank] = None
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_ddp_rank_stops_at_the_step_one_rank_went_non_finite():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    verdicts = mp.Manager().dict()
    mp.start_processes(_ddp_rank, args=(port, 3, verdicts), nprocs=2, join=True, start_method="spawn")
    (step0, loss0, message0), (step1, loss1, _) = verdicts[0], verdicts[1]
    assert step0 == step1 == 3  # both stop at once: neither waits for the other in a collective
    assert math.isfinite(loss0) and math.isnan(loss1)  # only rank 1 saw a non-finite loss ...
    assert message0.startswith("training diverged at step 3: loss ")  # ... rank 0 stops on the global norm
    assert "grad norm nan" in message0 and "at step 2)" in message0
