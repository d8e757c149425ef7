"""Data preparation: corpus sources, tokenization, token arrays on disk, content fingerprints.

`prepare_dataset(cfg)` turns `cfg.data.source` into `<workdir>/data/<fingerprint>/` holding train.bin and
val.bin (numpy memmaps), tokenizer.json and meta.json. sources.py parses the source string once into a
typed `Source`, resolves it (`check_source` is the cheap check the CLI runs before anything starts) and
pins its content digest; readers.py reads its documents, documents.py holds the document table and the
content-hash split, and prepare.py does the rest (see its docstring for the steps and the guarantees).
cache.py, the Prefect cache of the pipeline's prepare task, is imported by the pipeline only: nothing
here imports Prefect, so Ray workers can import this package.
"""

from flows.data.documents import is_val_document
from flows.data.prepare import FORMAT_VERSION, PreparedData, dataset_fingerprint, fingerprint, prepare_dataset
from flows.data.sources import Source, check_source, parse_source, pin_source, resolve_source, stdlib_files

__all__ = ["FORMAT_VERSION", "PreparedData", "Source", "check_source", "dataset_fingerprint", "fingerprint",
           "is_val_document", "parse_source", "pin_source", "prepare_dataset", "resolve_source", "stdlib_files"]
