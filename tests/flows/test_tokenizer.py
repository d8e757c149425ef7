"""The three tokenizers: exact round trips, vectorised batch encoding, byte counts, JSON save/load."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.errors import UserError
from flows.tokenizer import EOT, BPETokenizer, ByteTokenizer, CharTokenizer, load_tokenizer, new_tokenizer, token_dtype

TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld — ünïcode ✓\n", "日本語のテキスト 🚀🚀\n", "", "a" * 50]


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog\n" * 50]
    return BPETokenizer.train(iter([corpus]), 300)


def _tokenizers(bpe):
    return [new_tokenizer("char", "".join(TEXTS)), ByteTokenizer(), bpe]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_and_byte_counts(kind, bpe):
    tok = {t.kind: t for t in _tokenizers(bpe)}[kind]
    sizes = tok.token_bytes()
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert int(sizes[ids].sum()) == len(text.encode("utf-8"))
    assert tok.decode([tok.eot_id]) == "" and sizes[tok.eot_id] == 0
    assert tok.decode(tok.encode(TEXTS[0]) + [tok.eot_id] + tok.encode(TEXTS[1])) == TEXTS[0] + TEXTS[1]


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("large", [False, True])
def test_encode_arrow_matches_encode(kind, large, bpe):
    tok = {t.kind: t for t in _tokenizers(bpe)}[kind]
    rows = [t for t in TEXTS if t]
    column = pa.chunked_array([pa.array(rows[:2], pa.large_string() if large else pa.string()),
                               pa.array(rows[2:], pa.large_string() if large else pa.string())])
    ids, counts = tok.encode_arrow(column)
    assert ids.dtype == token_dtype(tok.vocab_size)
    assert counts.tolist() == [len(tok.encode(r)) for r in rows]
    assert ids.tolist() == [i for r in rows for i in tok.encode(r)]
    sliced, counts = tok.encode_arrow(pa.array(["return", "def f", "x"]).slice(1, 1))  # an offset into buffers
    assert sliced.tolist() == tok.encode("def f") and counts.tolist() == [len(tok.encode("def f"))]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_char_and_byte_round_trip_any_text(text):
    for tok in (CharTokenizer.train([text]), ByteTokenizer()):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=200))
def test_bpe_round_trips_any_text(bpe, text):
    # Byte-level BPE can encode any text, including characters it never saw while training.
    assert bpe.decode(bpe.encode(text)) == text


def test_char_rejects_unknown_characters():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(UserError, match="outside the char vocabulary: 'z'"):
        tok.encode("abz")
    with pytest.raises(UserError, match="outside"):
        tok.encode("\U0010ffff")


def test_char_ids_follow_code_points_and_end_with_eot():
    tok = CharTokenizer.train(["cab", "ä"])
    assert tok.chars == ["a", "b", "c", "ä"] and tok.eot_id == 4 and tok.vocab_size == 5
    assert tok.decode([0, 99, -1, 4, 1]) == "ab"  # out-of-range ids (a padded model head) decode to nothing


def test_bpe_literal_end_of_text_is_text(bpe):
    ids = bpe.encode(f"a{EOT}b")
    assert bpe.eot_id not in ids
    assert bpe.decode(ids) == f"a{EOT}b"
    again = pickle.loads(pickle.dumps(bpe))  # as datasets ships it to worker processes
    assert again.encode(f"a{EOT}b") == ids and again.vocab_size == bpe.vocab_size


def test_bpe_training_is_deterministic_and_honours_vocab_size(bpe):
    corpus = [t * 20 for t in TEXTS] + ["the quick brown fox jumps over the lazy dog\n" * 50]
    again = BPETokenizer.train(iter([corpus]), 300)
    assert again._tok.to_str() == bpe._tok.to_str()
    assert bpe.vocab_size == 300 and bpe.eot_id == 0


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_save_and_load_are_json(tmp_path: Path, kind, bpe):
    tok = {t.kind: t for t in _tokenizers(bpe)}[kind]
    tok.save(tmp_path / "tokenizer.json")
    json.loads((tmp_path / "tokenizer.json").read_text())  # plain JSON, no pickle
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eot_id) == (tok.kind, tok.vocab_size, tok.eot_id)
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_load_errors(tmp_path: Path):
    with pytest.raises(UserError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"kind": "wordpiece"}))
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(UserError, match="not a JSON tokenizer file"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="data.tokenizer: unknown tokenizer 'wordpiece'"):
        new_tokenizer("wordpiece")


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(2**16) == np.uint16 and token_dtype(2**16 + 1) == np.uint32


MULTILINGUAL = ["Ça va? Très bien — merci!\n", "Привет, мир 123 ½ Ⅻ\n", "مرحبا بالعالم\n", "नमस्ते दुनिया\n",
                "日本語と中文 🚀🎉 e\u0301\n", "tabs\tand\x0bodd\x1cspaces\u00a0\u2028here\r\n", "it's we'll  'd\n\n   x"]


@pytest.mark.parametrize("cache_size", [1_000_000, 50])
def test_bpe_batch_encoding_equals_encode_on_real_text(bpe, monkeypatch, cache_size):
    import sysconfig

    from flows import bpe_encode

    monkeypatch.setattr(bpe_encode, "WORD_CACHE", cache_size)  # small: the cache starts over again and again
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]
    rows = [f.read_text(encoding="utf-8") for f in files] + MULTILINGUAL + [f"a{EOT}b", ""]
    bpe = pickle.loads(pickle.dumps(bpe))  # a fresh word cache
    ids, counts = bpe.encode_arrow(pa.array(rows))
    assert counts.tolist() == [len(bpe.encode(r)) for r in rows]
    assert ids.tolist() == [i for r in rows for i in bpe.encode(r)]


@pytest.mark.parametrize("rows", [[], [""], ["ab cd\n" * ((1 << 20) // 6) + "ab c"], ["x" * (1 << 20), "tail"]])
def test_bpe_batch_encoding_edge_sizes(bpe, rows):
    ids, counts = bpe.encode_arrow(pa.array(rows, pa.string()))
    assert counts.tolist() == [len(bpe.encode(r)) for r in rows]
    assert ids.tolist() == [i for r in rows for i in bpe.encode(r)]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=127), max_size=60))
def test_bpe_batch_encoding_equals_encode_on_ascii(bpe, text):
    ids, _ = bpe.encode_arrow(pa.array([text]))
    assert ids.tolist() == bpe.encode(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=4))
def test_bpe_batch_encoding_decodes_exactly(bpe, rows):
    ids, counts = bpe.encode_arrow(pa.array(rows))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    assert [bpe.decode(ids[a:b].tolist()) for a, b in zip(bounds[:-1], bounds[1:])] == rows


def test_bpe_batch_encoding_without_pandas(bpe, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pandas)
    plain = pickle.loads(pickle.dumps(bpe))  # a fresh copy, without a word cache yet
    ids, _ = plain.encode_arrow(pa.array(MULTILINGUAL))
    assert plain._words is False
    assert ids.tolist() == [i for r in MULTILINGUAL for i in bpe.encode(r)]
