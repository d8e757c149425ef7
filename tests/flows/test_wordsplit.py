"""The numpy pre-tokenization and BPE training behind bpe prep (flows/wordsplit.py, bpe_encode.py,
bpe_train.py) against what they stand in for: the GPT-2 pattern, `tokenizers`' own encoding of each row,
and `tokenizers`' own BpeTrainer (the same tokenizer.json)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from flows import wordsplit
from flows.tokenizer import EOT, BPETokenizer, train_with_tokenizers
from flows.wordsplit import utf8_buffers, word_keys, word_starts

# What the pattern's alternatives turn on: contractions, spaces before words, whitespace runs, \x1c.
TRICKY = "ab'srtvelmdSLT09 \n\t\r\x0b\x0c\x1c!(-_."
MIXED = TRICKY + "é—日\u00a0\u2028🚀\x85\u3000\u0301½Ⅻ١"  # whitespace, a combining mark, digits
MULTILINGUAL = ["Ça va? Très bien — merci!\n", "Привет, мир 123 ½ Ⅻ\n", "مرحبا بالعالم\n", "नमस्ते दुनिया\n",
                "日本語と中文 🚀🎉 e\u0301\n", "tabs\tand\x0bodd\x1cspaces\u00a0\u2028here\r\n", "it's we'll  'd\n\n   x"]


def stdlib_texts(n: int) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n]
    return [f.read_text(encoding="utf-8") for f in files]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(iter([stdlib_texts(30) + MULTILINGUAL * 5]), 600)


def split_with_numpy(rows: list[str]) -> list[list[str]]:
    data, offsets = utf8_buffers(pa.array(rows, pa.string()))
    starts = word_starts(data, offsets)
    ends = np.append(starts[1:], len(data))
    text = data.tobytes()
    words = [text[a:b].decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]
    row = np.searchsorted(offsets, starts, side="right") - 1
    out = [[] for _ in rows]
    for r, w in zip(row.tolist(), words):
        out[r].append(w)
    return out


def split_with_tokenizers(rows: list[str]) -> list[list[str]]:
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return [[r[a:b] for _, (a, b) in pre.pre_tokenize_str(r)] for r in rows]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(MIXED), max_size=40), min_size=1, max_size=4))
def test_word_starts_give_the_words_of_tokenizers_pre_tokenizer(rows):
    assert split_with_numpy(rows) == split_with_tokenizers(rows)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), min_size=1, max_size=3))
def test_word_starts_on_any_text(rows):
    assert split_with_numpy(rows) == split_with_tokenizers(rows)


def test_word_starts_on_code_and_edge_cases():
    rows = stdlib_texts(20) + MULTILINGUAL + [
        "don't 'set x's ''s ('s \n's  's 'll 'LL 're've", "  a\n\n b\t\tc   ", "x'", "'", "", "'s's's",
        "a  \x1c b", "'r", "x 'l", "   ", "\n", "é 's  \u3000\u3000x", "\u3000", "a\u0301b", "日本語テキスト。"]
    assert split_with_numpy(rows) == split_with_tokenizers(rows)


def test_word_keys_are_exact_for_short_ascii_and_checkable_up_to_16_bytes():
    words = ["a", "a\x00", "\x00a", "ab", "abcdefgh", "abcdefgh\x00", "abcdefghi", "abcdefghij", " " * 16, " " * 15,
             "é", "é\x00", "日本", "abcdefgé"]
    data = np.frombuffer("".join(words).encode(), np.uint8)
    lengths = np.array([len(w.encode()) for w in words])
    key, low, high = word_keys(data, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    assert len(set(key.tolist())) == len(words)
    assert set(np.flatnonzero(key >= wordsplit.HASHED).tolist()) == {5, 6, 7, 8, 9, 10, 11, 12, 13}
    hashed = [(low[i], high[i], lengths[i]) for i in range(5, 14)]  # what a hashed key is checked against
    assert len(set(hashed)) == len(hashed)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(MIXED), max_size=60), min_size=1, max_size=5))
def test_encode_arrow_equals_tokenizers_on_mixed_text(bpe, rows):
    ids, counts = bpe.encode_arrow(pa.array(rows))
    expected = [e.ids for e in bpe._tok.encode_batch(rows, add_special_tokens=False)]
    assert counts.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [i for e in expected for i in e]


def test_encode_arrow_survives_hash_collisions(bpe, monkeypatch):
    """With a hash that maps every hashed word (non-ASCII, or 9 to 16 bytes) to one key, those words are still encoded right
    (found out within the batch and against the words seen before)."""
    import pickle

    monkeypatch.setattr(wordsplit, "_MIX", np.uint64(0))
    fresh = pickle.loads(pickle.dumps(bpe))
    rows = ["abcdefghij klmnopqrstu é", "vwxyzabcdef abcdefghij ü", "unrelated words here", "привет мир é",
            "мир привет ü 日本"] + stdlib_texts(3)
    for batch in (rows[:2], rows):  # the second batch meets keys the first stored
        ids, _ = fresh.encode_arrow(pa.array(batch))
        assert ids.tolist() == [i for r in batch for i in bpe.encode(r)]


@pytest.mark.parametrize(("name", "vocab"), [("stdlib", 1024), ("multilingual", 600), ("repeats", 270),
                                             ("shakespeare", 512)])
def test_training_gives_tokenizers_own_result(name, vocab, shakespeare):
    texts = {"stdlib": stdlib_texts(40), "multilingual": MULTILINGUAL * 30 + [m * 7 for m in MULTILINGUAL],
             "repeats": ["aaaa bbbb aaaa abab " * 10, "    " * 30, "=" * 33],
             "shakespeare": [Path(shakespeare).read_text()[:300_000]]}[name]
    batches = [texts[i: i + 10] for i in range(0, len(texts), 10)]
    fast = BPETokenizer.train(iter(batches), vocab)
    assert fast._tok.to_str() == train_with_tokenizers(iter(batches), vocab).to_str()
    assert fast.eot_id == 0 and fast._tok.id_to_token(0) == EOT
