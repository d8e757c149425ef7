"""A Ray Train run's training settings, saved beside its checkpoints: a reused run name resumes only the
same training.

A run name names one training: starting it again (the same command after its driver died, a Prefect
retry) resumes from the last checkpoint Ray Train finds under <storage_path>/<run name>/. So that a
reused name never continues a checkpoint under other settings, the first start saves what determines the
training (`training_settings`) as <storage_path>/<run name>/pipeline-run.json, and every later start
compares its own with it: any difference is a UserError naming the keys, raised before training starts.
`check_run_settings` compares all but the data before anything starts (the CLI's preflight);
`claim_run_settings` compares the data too, and saves the file, once the data is prepared (the driver).

What determines the training: the whole `model` section; the data (its content fingerprint, which covers
the corpus and the tokenizer settings); the optimizer and schedule (TRAINING_KEYS); the global batch,
train.batch_size x train.num_workers windows per micro-step (2 workers of 4 sample exactly what 1 worker of
8 does, so a resume may change the split); and the precision used (train.precision, 'auto' resolved by
train.use_gpu). The other train keys (OPERATIONAL_KEYS: logging, evaluation, checkpoint cadence, CPUs,
placement, DDP or FSDP2, which share one checkpoint format, compilation, the Ray address) and the other
sections may change between attempts.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from flows.errors import UserError

RUN_FILE = "pipeline-run.json"
TRAINING_KEYS = ("max_steps", "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2",
                 "grad_clip", "seed", "optimizer", "schedule", "decay_fraction", "muon_lr", "muon_momentum",
                 "muon_weight_decay")
DERIVED_KEYS = ("batch_size", "num_workers", "precision", "use_gpu")  # compared through what they make
OPERATIONAL_KEYS = ("cpus_per_worker", "strategy", "compile", "eval_interval", "eval_batches", "log_interval",
                    "checkpoint_interval", "num_to_keep", "checkpoint_score", "placement_strategy", "max_failures",
                    "ray_address", "storage_path", "run_name", "timeout_s", "startup_timeout_s")
DATA_KEY = "data.fingerprint"


def training_settings(cfg: PipelineConfig, data_fingerprint: str | None = None) -> dict[str, Any]:
    """What determines the training of cfg, flat and JSON-valued (see the module docstring)."""
    tc = cfg.train
    precision = tc.precision if tc.precision != "auto" else ("bf16" if tc.use_gpu else "fp32")
    settings = {f"model.{k}": v for k, v in cfg.model_dump(mode="json")["model"].items()}
    settings.update({f"train.{k}": getattr(tc, k) for k in TRAINING_KEYS})
    settings.update({"train.batch_size*num_workers": tc.batch_size * tc.num_workers, "train.precision": precision})
    if data_fingerprint is not None:
        settings[DATA_KEY] = data_fingerprint
    return json.loads(json.dumps(settings))  # as read back from the file


def run_file_uri(storage_path: str, run_name: str) -> str:
    return f"{storage_path.rstrip('/')}/{run_name}/{RUN_FILE}"


def _filesystem(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))


def read_run_settings(storage_path: str, run_name: str) -> dict[str, Any] | None:
    """The settings saved when run_name was first started, or None when it never was."""
    import pyarrow.fs as pafs

    uri = run_file_uri(storage_path, run_name)
    fs, path = _filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))["settings"]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"train.run_name: {uri} cannot be read ({type(err).__name__}: {err}); delete it only if "
                        f"run {run_name!r} should resume whatever it was started with") from None


def _show(value: Any) -> str:
    text = "unset" if value is _MISSING else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


_MISSING = object()


def _compare(saved: dict[str, Any], now: dict[str, Any], run_name: str, uri: str) -> None:
    keys = sorted(set(saved) | set(now)) if DATA_KEY in now else sorted((set(saved) | set(now)) - {DATA_KEY})
    diffs = [k for k in keys if saved.get(k, _MISSING) != now.get(k, _MISSING)]
    if diffs:
        changes = ", ".join(f"{k} {_show(saved.get(k, _MISSING))} -> {_show(now.get(k, _MISSING))}" for k in diffs)
        raise UserError(f"train.run_name: run {run_name!r} was started with other training settings, so it cannot "
                        f"resume with these ({changes}; saved in {uri}): rerun with its settings or choose a new "
                        "train.run_name")


def check_run_settings(cfg: PipelineConfig) -> None:
    """Before anything starts: a configured train.run_name that was started before must have had these
    settings (all but the data, which is compared once prepared)."""
    if cfg.train.run_name is None:
        return  # derived from the flow run, whose parameters a retry keeps
    storage = cfg.storage_path()
    saved = read_run_settings(storage, cfg.train.run_name)
    if saved is not None:
        _compare(saved, training_settings(cfg), cfg.train.run_name, run_file_uri(storage, cfg.train.run_name))


def claim_run_settings(cfg: PipelineConfig, storage_path: str, run_name: str, data_fingerprint: str) -> None:
    """Before training: compare with the settings run_name was started with, or save these as its first start's."""
    uri = run_file_uri(storage_path, run_name)
    now = training_settings(cfg, data_fingerprint)
    saved = read_run_settings(storage_path, run_name)
    if saved is not None:
        _compare(saved, now, run_name, uri)
        return
    body = json.dumps({"run_name": run_name, "settings": now}, indent=2, sort_keys=True).encode()
    if "://" in uri:  # an object store: one PUT is atomic
        fs, path = _filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(body)
        return
    path = Path(uri).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{RUN_FILE}.", delete=False) as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, path)  # never half-written, whenever the driver dies
