"""The Prefect cache of the pipeline's prepare_dataset task, and the one resolution and hash of a run.

A flow run resolves `data.source` and hashes its files once, before the task (`source_for_run`); the
pinned `Source` is the task's input, so the task's cache key (`DataFingerprintCache`), the check that a
cached result's directory still exists and matches its meta.json (`prepare_options`) and the prep itself
all use that one digest, and nothing lists or hashes the corpus again. Only local sources are pinned here:
remote and Hub sources are pinned by the prep (metadata calls that may fail), so Prefect does not cache
them; the prep's own content-addressed reuse still does. Results are persisted as JSON under
<workdir>/prefect-results. This module imports Prefect, so flows.data does not import it: Ray workers import flows.data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefect.cache_policies import CachePolicy

from flows.config import PipelineConfig
from flows.data.integrity import verify_prepared
from flows.data.prepare import dataset_fingerprint
from flows.data.sources import Source, pin_source, resolve_source
from flows.errors import UserError


def source_for_run(cfg: PipelineConfig) -> Source | None:
    """cfg.data.source resolved once for the run, and pinned (its files hashed) when it is local files;
    None when that fails here, so that the task, which tries again, reports the real error."""
    try:
        source = resolve_source(cfg.data.source)
        return pin_source(source) if source.kind in ("stdlib", "local") else source
    except Exception:  # noqa: BLE001 - the task's failure is the one the user and the retry policy see
        return None


def _fingerprint(cfg: PipelineConfig, source: Source | None) -> str | None:
    if source is None or not source.digest:
        return None
    try:
        return dataset_fingerprint(cfg, source)
    except UserError:  # invalid data settings: the task raises it
        return None


@dataclass
class DataFingerprintCache(CachePolicy):
    """prepare_dataset's cache key: the data fingerprint of the task's pinned `source` (no key without
    one), plus the workdir and block size its result depends on (the path it returns, and the corpus-size
    check)."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        cfg: PipelineConfig = inputs["cfg"]
        fp = _fingerprint(cfg, inputs.get("source"))
        if fp is None:
            return None
        extra = hashlib.sha256(json.dumps([str(cfg.workdir_path), cfg.model.block_size]).encode()).hexdigest()
        return f"prepare_dataset-{fp}-{extra[:16]}"


def prepare_options(cfg: PipelineConfig, source: Source | None) -> dict:
    """prepare_dataset_task's options for this run: results under the workdir, and a cached result whose
    directory is gone or no longer matches its meta.json (sizes and checksums: integrity.py) recomputed and
    overwritten (refresh_cache) instead of handed to training; the prep then rebuilds it with a warning."""
    fp = _fingerprint(cfg, source)
    damaged = fp is not None and verify_prepared(cfg.workdir_path / "data" / fp) is not None  # prepare.py's layout
    return {"result_storage": cfg.workdir_path / "prefect-results",  # a Path: a local folder, no block to save
            "refresh_cache": True if damaged else None}
