"""Data preparation: corpus sources, tokenization, token arrays on disk, content fingerprints.

`prepare_dataset(cfg)` turns `cfg.data.source` into `<workdir>/data/<fingerprint>/` holding train.bin and
val.bin (numpy memmaps), tokenizer.json and meta.json; `resolve_source` is the cheap check the CLI runs
before anything starts. sources.py resolves and fingerprints sources, readers.py reads their documents,
documents.py holds the document table and the content-hash split, and prepare.py does the rest (see its
docstring for the steps and the guarantees).
"""

from flows.data.documents import is_val_document
from flows.data.prepare import FORMAT_VERSION, PreparedData, fingerprint, fingerprint_inputs, prepare_dataset
from flows.data.sources import Source, resolve_source, stdlib_files

__all__ = ["FORMAT_VERSION", "PreparedData", "Source", "fingerprint", "fingerprint_inputs", "is_val_document",
           "prepare_dataset", "resolve_source", "stdlib_files"]
