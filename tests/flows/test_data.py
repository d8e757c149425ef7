"""prepare_dataset end to end on tiny corpora made in the test: every source type, every tokenizer, splits,
fingerprints and reuse. Each test checks the token arrays by decoding them back into documents."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config import PipelineConfig, validate_config
from flows.data import PreparedData, is_val_document, prepare_dataset, resolve_source
from flows.data import prepare as prepare_mod
from flows.data import readers
from flows.errors import UserError
from flows.tokenizer import load_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu naïve café 日本 🚀".split()


def make_docs(n: int, start: int = 0) -> list[str]:
    """Distinct documents of a few lines each, some with non-ASCII text."""
    return [f"doc {i}: " + " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(12)) + f"\nline two of {i}\n"
            for i in range(start, start + n)]


def config(tmp_path: Path, source, **data) -> PipelineConfig:
    return validate_config({"workdir": str(tmp_path / "work"), "data": {"source": str(source), **data},
                            "model": {"block_size": 8}})


def decoded_documents(data: PreparedData) -> dict[str, list[str]]:
    """The documents of each split, decoded from train.bin / val.bin (end-of-text separates them)."""
    tok = load_tokenizer(data.path)
    out = {}
    for split in ("train", "val"):
        ids = data.tokens(split).tolist()
        docs, cur = [], []
        for i in ids:
            if i == tok.eot_id:
                docs.append(tok.decode(cur))
                cur = []
            else:
                cur.append(i)
        assert not cur, f"{split}.bin does not end with end-of-text"
        out[split] = docs
    return out


def assert_hash_split(data: PreparedData, docs: list[str], val_fraction: float = 0.1) -> None:
    got = decoded_documents(data)
    assert data.split == "hash"
    assert sorted(got["train"] + got["val"]) == sorted(docs)
    assert all(is_val_document(d, val_fraction) for d in got["val"])
    assert not any(is_val_document(d, val_fraction) for d in got["train"])
    assert data.val_bytes == sum(len(d.encode()) for d in got["val"])
    assert data.train_bytes == sum(len(d.encode()) for d in got["train"])
    assert (data.train_documents, data.val_documents) == (len(got["train"]), len(got["val"]))


def write_text_files(root: Path, docs: list[str], ext: str = ".txt") -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(docs):
        (root / f"f{i:03d}{ext}").write_text(d, encoding="utf-8")


def write_rows(path: Path, docs: list[str]) -> None:
    """docs as rows of a .jsonl/.json/.csv/.tsv/.parquet file, in a column "body" next to other columns."""
    rows = [{"id": i, "body": d, "n": len(d)} for i, d in enumerate(docs)]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 5 == 0 else "") for i, r in enumerate(rows)))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False))
    elif path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["id", "body", "n"], delimiter="," if path.suffix == ".csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.table({"id": [r["id"] for r in rows], "body": docs, "n": [r["n"] for r in rows]}),
                       path, row_group_size=7)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_row_sources(tmp_path: Path, ext):
    docs = make_docs(50) + ['quoted, "comma"\nand newline inside a field\n']
    write_rows(tmp_path / f"corpus{ext}", docs)
    data = prepare_dataset(config(tmp_path, tmp_path / f"corpus{ext}", text_column="body", tokenizer="byte"))
    assert_hash_split(data, docs)


def test_rows_skip_null_and_empty_text(tmp_path: Path):
    lines = [{"text": d} for d in make_docs(30)] + [{"text": None}, {"text": ""}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = prepare_dataset(config(tmp_path, tmp_path / "c.jsonl", tokenizer="byte"))
    assert data.train_documents + data.val_documents == 30


def test_text_directory_glob_and_mixed_kinds(tmp_path: Path):
    docs = make_docs(40)
    write_text_files(tmp_path / "corpus" / "a", docs[:20], ".md")
    write_text_files(tmp_path / "corpus" / "b", docs[20:30], ".py")
    write_rows(tmp_path / "corpus" / "rows.jsonl", docs[30:])
    (tmp_path / "corpus" / ".hidden").write_text("not part of the corpus")
    data = prepare_dataset(config(tmp_path, tmp_path / "corpus", text_column="body", tokenizer="byte"))
    assert_hash_split(data, docs)
    md = prepare_dataset(config(tmp_path, tmp_path / "corpus" / "**" / "*.md", tokenizer="byte"))
    assert_hash_split(md, docs[:20])


def test_remote_fsspec_uris(tmp_path: Path):
    import fsspec

    fs = fsspec.filesystem("memory")
    docs = make_docs(40)
    write_rows(tmp_path / "rows.parquet", docs[:25])
    fs.pipe("/bucket/prefix/part-0.parquet", (tmp_path / "rows.parquet").read_bytes())
    for i, d in enumerate(docs[25:]):
        fs.pipe(f"/bucket/prefix/text-{i}.txt", d.encode())
    try:
        data = prepare_dataset(config(tmp_path, "memory://bucket/prefix/*", text_column="body", tokenizer="byte"))
        assert_hash_split(data, docs)
        assert resolve_source("memory://bucket/prefix").files == resolve_source("memory://bucket/prefix/*").files
        again = prepare_dataset(config(tmp_path, "memory://bucket/prefix/*", text_column="body", tokenizer="byte"))
        assert again.reused and again.fingerprint == data.fingerprint
    finally:
        fs.rm("/bucket", recursive=True)
    write_text_files(tmp_path / "local", docs)
    local = prepare_dataset(config(tmp_path, f"file://{tmp_path / 'local'}/*.txt", tokenizer="byte"))
    assert_hash_split(local, docs)


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_each_tokenizer(tmp_path: Path, tokenizer):
    docs = make_docs(60)
    write_text_files(tmp_path / "corpus", docs)
    data = prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer=tokenizer, vocab_size=300))
    assert_hash_split(data, docs)
    tok = load_tokenizer(data.path)
    assert (data.tokenizer, data.vocab_size, data.dtype) == (tokenizer, tok.vocab_size, "uint16")
    assert data.train_tokens == len(data.tokens("train")) and data.val_tokens == len(data.tokens("val"))
    meta = json.loads((Path(data.path) / "meta.json").read_text())
    assert meta["splits"]["val"] == {"documents": data.val_documents, "bytes": data.val_bytes,
                                     "tokens": data.val_tokens}
    assert meta["source"]["files"] == 60 and meta["settings"]["tokenizer"] == tokenizer
    assert {"datasets", "tokenizers", "pyarrow", "numpy", "python"} <= set(meta["versions"])
    if tokenizer == "char":  # the alphabet of the whole corpus (val included) plus end-of-text
        assert tok.vocab_size == len(set("".join(docs))) + 1
    if tokenizer == "bpe":
        assert tok.vocab_size == 300


def test_bpe_trains_on_the_training_split_only(tmp_path: Path):
    marker = "zyzzyvaquux"  # repeated in validation documents only: BPE must learn no merge for it
    docs = []
    for d in make_docs(60):
        marked = d + (marker + " ") * 30
        docs.append(marked if is_val_document(marked, 0.1) else d)
    write_text_files(tmp_path / "corpus", docs)
    data = prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="bpe", vocab_size=1000))
    tok = load_tokenizer(data.path)
    assert any(marker in d for d in decoded_documents(data)["val"])
    assert len(tok.encode(" " + marker)) > 3
    assert len(tok.encode(" gamma")) == 1


def test_bpe_training_sample_spreads_over_the_split(tmp_path: Path, monkeypatch):
    docs = make_docs(60)
    write_text_files(tmp_path / "corpus", docs)
    seen: list[str] = []
    real = prepare_mod._bpe_training_texts

    def spy(table, tail, val_fraction, limit):
        for batch in real(table, tail, val_fraction, 1000):  # about 1000 bytes: one document in six
            seen.extend(batch)
            yield batch
    monkeypatch.setattr(prepare_mod, "_bpe_training_texts", spy)
    prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="bpe", vocab_size=300))
    train = [d for d in docs if not is_val_document(d, 0.1)]
    assert seen == train[:: -(-sum(len(d.encode()) for d in train) // 1000)]


def test_single_document_splits_by_its_tail(tmp_path: Path):
    text = "".join(make_docs(30))
    (tmp_path / "one.txt").write_text(text)
    data = prepare_dataset(config(tmp_path, tmp_path / "one.txt", tokenizer="char"))
    tok = load_tokenizer(data.path)
    n = len(text) + 1  # one id per character, then end-of-text
    assert data.split == "tail"
    assert (data.train_tokens, data.val_tokens) == (int(n * 0.9), n - int(n * 0.9))
    train, val = data.tokens("train").tolist(), data.tokens("val").tolist()
    assert tok.decode(train) + tok.decode(val) == text and val[-1] == tok.eot_id
    assert data.val_bytes == len(tok.decode(val).encode()) and data.train_bytes == len(tok.decode(train).encode())
    assert (data.train_documents, data.val_documents) == (1, 1)


def test_long_text_file_in_pieces(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(readers, "CHUNK_BYTES", 64)
    text = "".join(make_docs(20)) + "é" * 1000 + "no newline at the end: 日本🚀"
    (tmp_path / "one.txt").write_text(text)
    data = prepare_dataset(config(tmp_path, tmp_path / "one.txt", tokenizer="char"))
    tok = load_tokenizer(data.path)
    assert tok.decode(data.tokens("train").tolist() + data.tokens("val").tolist()) == text


def test_adding_documents_never_moves_old_ones(tmp_path: Path):
    docs = make_docs(80)
    write_text_files(tmp_path / "corpus", docs)
    before = decoded_documents(prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="byte")))
    write_text_files(tmp_path / "corpus2", docs + make_docs(40, start=80))
    after = decoded_documents(prepare_dataset(config(tmp_path, tmp_path / "corpus2", tokenizer="byte")))
    assert set(before["val"]) <= set(after["val"]) and set(before["train"]) <= set(after["train"])
    assert len(after["train"]) + len(after["val"]) == 120


def test_fingerprint_reuse_and_what_changes_it(tmp_path: Path):
    write_text_files(tmp_path / "corpus", make_docs(40))
    base = config(tmp_path, tmp_path / "corpus", tokenizer="char")
    first = prepare_dataset(base)
    assert not first.reused
    second = prepare_dataset(base.model_copy(update={"model": dataclasses.replace(base.model, block_size=16)}))
    assert second.reused and second.path == first.path  # block_size is not part of the data
    data_dir = tmp_path / "work" / "data"
    assert [p.name for p in data_dir.iterdir()] == [first.fingerprint]

    changed = {
        "tokenizer": prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="byte")),
        "val_fraction": prepare_dataset(config(tmp_path, tmp_path / "corpus", tokenizer="char", val_fraction=0.2)),
    }
    (tmp_path / "corpus" / "f000.txt").write_text("edited " + make_docs(1)[0])
    changed["content"] = prepare_dataset(base)
    fps = {first.fingerprint} | {d.fingerprint for d in changed.values()}
    assert len(fps) == 4 and not any(d.reused for d in changed.values())


def test_uint32_when_the_vocabulary_needs_it(tmp_path: Path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000]
    (tmp_path / "wide.txt").write_text("".join(chars) * 2)
    data = prepare_dataset(config(tmp_path, tmp_path / "wide.txt", tokenizer="char"))
    assert data.dtype == "uint32" and data.vocab_size == len(chars) + 1
    assert data.tokens("train")[:3].tolist() == [0, 1, 2]


def test_more_processes_same_result(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(prepare_mod, "MAP_BATCH_BYTES", 2000)
    docs = make_docs(120)
    write_text_files(tmp_path / "corpus", docs)
    one = prepare_dataset(config(tmp_path / "one", tmp_path / "corpus", tokenizer="char", num_proc=1))
    two = prepare_dataset(config(tmp_path / "two", tmp_path / "corpus", tokenizer="char", num_proc=2))
    assert one.fingerprint == two.fingerprint
    for split in ("train", "val"):
        assert np.array_equal(one.tokens(split), two.tokens(split))


def test_default_source_is_the_stdlib(tmp_path: Path):
    src = resolve_source("python-stdlib")
    assert src.kind == "stdlib" and len(src.files) > 50 and all(f.endswith(".py") for f in src.files)
    names = [Path(f).name for f in src.files]
    assert names == sorted(names)


@pytest.mark.parametrize("source", ["python-stdlib", "corpus", "corpus/*.txt"])
def test_dataset_fingerprint_predicts_the_directory(tmp_path: Path, source):
    from flows.data import dataset_fingerprint, pin_source

    write_text_files(tmp_path / "corpus", make_docs(20))
    spec = source if source == "python-stdlib" else str(tmp_path / source)
    cfg = config(tmp_path, spec, tokenizer="byte")
    pinned = pin_source(resolve_source(spec))
    assert dataset_fingerprint(cfg, pinned) == prepare_dataset(cfg).fingerprint == prepare_dataset(cfg, pinned).fingerprint


def test_hub_source_streams_the_pinned_commit(tmp_path: Path, monkeypatch):
    """The hf: path without a network: the Hub's answers stand in, the rest is real datasets code."""
    import datasets
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    docs = make_docs(40)
    calls = {}

    class Info:
        sha = "0123abcd" * 5

    def load_dataset(path, name=None, *, split, streaming, revision, cache_dir):
        calls.update(path=path, name=name, split=split, streaming=streaming, revision=revision)
        return datasets.IterableDataset.from_generator(lambda: ({"body": d, "id": i} for i, d in enumerate(docs)))

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id, **kw: Info())
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = config(tmp_path, "hf:owner/name", text_column="body", config="small", split="validation", tokenizer="byte")
    data = prepare_dataset(cfg)
    assert calls == {"path": "owner/name", "name": "small", "split": "validation", "streaming": True,
                     "revision": Info.sha}
    assert_hash_split(data, docs)
    meta = json.loads((Path(data.path) / "meta.json").read_text())
    assert meta["source"] == {"spec": "hf:owner/name", "kind": "hf", "repo_id": "owner/name", "revision": Info.sha}
    assert prepare_dataset(cfg).reused

    cfg.data.text_column = "content"
    with pytest.raises(UserError, match="'content' is not a column of hf:owner/name; columns there: body, id"):
        prepare_dataset(cfg)
