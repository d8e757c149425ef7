"""Evaluation on tiny models: whole-split deterministic windows, batching, bits per byte, samples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_core import ModelConfig, Transformer
from flows.errors import UserError
from flows.evaluate import attention_example, evaluate_pack, score_split, window_count
from flows.tokenizer import CharTokenizer

TEXT = "the quick brown fox jumps over the lazy dog; naïve café — ünïcödé\n" * 8


@pytest.fixture(scope="module")
def setup():
    tok = CharTokenizer.train([TEXT])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    return model, tok, np.asarray(tok.encode(TEXT), dtype=np.uint16)


@pytest.mark.parametrize("n_tokens, block, max_tokens, expected", [
    (100, 8, None, 12), (97, 8, None, 12), (96, 8, None, 11), (100, 8, 40, 5), (100, 8, 1000, 12),
])
def test_window_count_uses_the_whole_split(n_tokens, block, max_tokens, expected):
    assert window_count(n_tokens, block, max_tokens) == expected


def test_window_count_rejects_a_split_shorter_than_one_window():
    # a user error (never retried), naming what to change
    with pytest.raises(UserError, match="shorter than one window.*model.block_size"):
        window_count(8, 8)
    with pytest.raises(UserError, match="eval.max_tokens: 4"):
        window_count(100, 8, 4)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
def test_score_is_the_same_for_any_batch_size(setup, batch_size):
    model, tok, tokens = setup
    ref = score_split(model, tok, tokens, block_size=8, batch_size=5)
    got = score_split(model, tok, tokens, block_size=8, batch_size=batch_size)
    assert got.windows == ref.windows == (len(tokens) - 1) // 8
    assert got.tokens == ref.tokens and got.bytes == ref.bytes
    assert got.nll == pytest.approx(ref.nll, rel=1e-5)


def test_score_matches_a_direct_computation_and_counts_utf8_bytes(setup):
    model, tok, tokens = setup
    score = score_split(model, tok, tokens, block_size=8, batch_size=4)
    n = score.windows * 8
    x = torch.tensor(tokens[:n].astype(np.int64)).view(-1, 8)
    y = torch.tensor(tokens[1: n + 1].astype(np.int64)).view(-1, 8)
    with torch.no_grad():
        logits, _ = model(x)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
    assert score.nll == pytest.approx(nll, rel=1e-5)
    text = tok.decode(tokens[1: n + 1].tolist())
    assert score.bytes == len(text.encode("utf-8")) > len(text)  # multi-byte characters counted as bytes
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / score.bytes)
    assert score.val_loss == pytest.approx(nll / n)


def test_max_tokens_scores_a_prefix(setup):
    model, tok, tokens = setup
    part = score_split(model, tok, tokens, block_size=8, batch_size=4, max_tokens=33)
    assert part.windows == 4 and part.tokens == 32


def test_score_leaves_a_training_model_in_training_mode(setup):
    model, tok, tokens = setup
    model.train()
    try:
        score_split(model, tok, tokens, block_size=8, batch_size=4)
        assert model.training
    finally:
        model.eval()


def test_evaluate_pack_is_deterministic(setup, tmp_path):
    from flows.config import load_config
    from flows.data import PreparedData

    model, tok, tokens = setup
    tokens.tofile(tmp_path / "val.bin")
    data = PreparedData(path=str(tmp_path), fingerprint="x", tokenizer="char", vocab_size=tok.vocab_size,
                        dtype="uint16", train_tokens=0, val_tokens=len(tokens), val_bytes=0)
    cfg = load_config(overrides=["eval.prompts=['the ', 'fox']", "eval.max_new_tokens=6", "eval.batch_size=3"])
    first, second = evaluate_pack(model, tok, data, cfg), evaluate_pack(model, tok, data, cfg)
    assert first == second
    assert [s["prompt"] for s in first.samples] == ["the ", "fox"]
    assert all(len(s["completion"]) <= 6 for s in first.samples)  # 6 tokens; end-of-text decodes to nothing
    assert first.perplexity == pytest.approx(math.exp(first.val_loss))
    assert set(first.metrics()) >= {"eval_val_loss", "eval_perplexity", "eval_bits_per_byte"}


def test_attention_example_is_a_layer_head_grid_of_causal_maps(setup):
    model, tok, _ = setup
    maps, labels = attention_example(model, tok, "the quick brown fox", max_tokens=6)
    assert maps.shape == (1, 2, 6, 6)
    assert labels == list("the qu")
    assert np.allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.allclose(np.triu(maps, k=1), 0.0)


def test_default_prompts_come_from_the_validation_split_not_from_python():
    """Without eval.prompts, the samples continue lines of the corpus itself (a Shakespeare model is not
    asked to continue 'def '), each a line's start, inside a char model's vocabulary by construction."""
    import numpy as np

    from flows.evaluate import prompts_from_split
    from flows.tokenizer import CharTokenizer

    text = "".join(f"ROMEO{i}:\nSoft {i}, what light through yonder window breaks?\n" for i in range(60))
    tok = CharTokenizer.train([text])
    prompts = prompts_from_split(np.array(tok.encode(text)), tok)
    assert len(prompts) == 3 and len(set(prompts)) == 3
    for p in prompts:
        assert p in text and "\n" not in p and len(p) <= 24 and not p.startswith("def")
        assert tok.encode(p)  # encodable
