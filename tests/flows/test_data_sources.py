"""data.source parsed once into a `Source`: its kind and label by syntax alone, the CLI's check with the same
errors as the full resolution, and a pinned source handed to prepare_dataset never hashed again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flows.data import check_source, dataset_fingerprint, parse_source, pin_source, prepare_dataset, resolve_source
from flows.data import sources
from flows.errors import UserError
from tests.flows.test_data import config, make_docs, write_text_files


@pytest.fixture
def hashed(monkeypatch) -> Counter:
    """Counts, per file, the hashes the real sha256 of flows.data.sources computes."""
    counts: Counter = Counter()
    real = sources._file_sha256

    def counting(path: str) -> str:
        counts[path] += 1
        return real(path)

    monkeypatch.setattr(sources, "_file_sha256", counting)
    return counts


@pytest.mark.parametrize("spec, kind, label", [
    ("python-stdlib", "stdlib", "python-stdlib"), ("/data/tinyshakespeare.txt", "local", "tinyshakespeare"),
    ("corpus/**/*.txt", "local", "corpus"), ("*.txt", "local", "glob"), ("~/corpus/", "local", "corpus"),
    ("hf:karpathy/tiny_shakespeare", "hf", "tiny-shakespeare"), ("s3://bucket/My Corpus/", "remote", "my-corpus"),
    ("file:///data/x/*.txt", "remote", "txt"),
])
def test_parse_decides_kind_and_label_without_io(spec, kind, label):
    src = parse_source(spec)
    assert (src.kind, src.label, src.files, src.digest) == (kind, label, (), "")
    assert parse_source(spec) is src  # parsed once per process


@pytest.mark.parametrize("spec, message", [
    ("{tmp}/nope.txt", "data.source: path not found: .*nope.txt"),
    ("{tmp}/*.jsonl", r"data.source: glob '.*\*.jsonl' matched no files"),
    ("{tmp}/empty", "data.source: directory .*empty holds no files"),
    ("hf:", "not a Hugging Face dataset name"),
    ("nosuchproto://bucket/x", "data.source: nosuchproto://bucket/x: Protocol not known"),
])
def test_check_fails_like_resolve(tmp_path: Path, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("not part of the corpus")
    spec = spec.format(tmp=tmp_path)
    for step in (check_source, resolve_source):
        with pytest.raises(UserError, match=message):
            step(spec)


def test_check_lists_nothing_it_returns(tmp_path: Path):
    write_text_files(tmp_path / "corpus", make_docs(5))
    checked = check_source(str(tmp_path / "corpus"))
    assert checked.kind == "local" and checked.files == ()
    resolved = resolve_source(checked)
    assert len(resolved.files) == 5 and resolve_source(resolved) is resolved


def test_a_pinned_source_is_hashed_once(tmp_path: Path, hashed: Counter):
    write_text_files(tmp_path / "corpus", make_docs(20))
    cfg = config(tmp_path, tmp_path / "corpus", tokenizer="byte")
    pinned = pin_source(resolve_source(cfg.data.source))
    assert sorted(hashed) == list(pinned.files) and set(hashed.values()) == {1}
    assert pin_source(pinned) is pinned
    data = prepare_dataset(cfg, pinned)
    again = prepare_dataset(cfg, pinned)
    assert set(hashed.values()) == {1}  # the prep and its reuse took the digest the source carries
    assert data.fingerprint == again.fingerprint == dataset_fingerprint(cfg, pinned) and again.reused
    assert prepare_dataset(cfg).fingerprint == data.fingerprint  # on its own, the prep hashes them itself
    assert set(hashed.values()) == {2}


def test_pinning_needs_a_resolved_source_and_prep_its_own_source(tmp_path: Path):
    write_text_files(tmp_path / "corpus", make_docs(5))
    with pytest.raises(ValueError, match="not resolved"):
        pin_source(parse_source(str(tmp_path / "corpus")))
    other = pin_source(resolve_source("python-stdlib"))
    with pytest.raises(ValueError, match="is not cfg.data.source"):
        prepare_dataset(config(tmp_path, tmp_path / "corpus"), other)


def test_a_directory_lists_its_visible_files_like_rglob(tmp_path: Path):
    root = tmp_path / "corpus"
    for name in ("x.txt", ".hidden", "a/y.txt", ".git/z.txt", "b/.cache/q.txt", "b/w.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "e.txt").write_text("e")
    (root / "b" / "linked-folder").symlink_to(tmp_path / "elsewhere")  # not entered, as rglob does not
    (root / "b" / "linked-file").symlink_to(root / "a" / "y.txt")
    (root / "b" / "broken").symlink_to(tmp_path / "nowhere")
    expected = sorted(str(q) for q in root.rglob("*") if q.is_file()
                      and not any(part.startswith(".") for part in q.relative_to(root).parts))
    assert resolve_source(str(root)).files == tuple(expected)
    assert [Path(f).relative_to(root).as_posix() for f in expected] == ["a/y.txt", "b/linked-file", "b/w.txt", "x.txt"]
