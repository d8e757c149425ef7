"""PipelineConfig: the one typed configuration of the pipeline, end to end.

It is read from an optional YAML file (or a whole config as JSON), then `--set dotted.key=value`
overrides, each value parsed by its field's type; the environment (MLFLOW_TRACKING_URI, RAY_ADDRESS)
is read once, at the edge, by `with_environment`. It travels unchanged to Prefect tasks and, as
`cfg.model_dump()`, to Ray workers, whose first line validates it back. Its `model` section is
attention_core's ModelConfig itself, so the model's fields, defaults and checks exist once. Every
field carries a description so the Prefect UI form explains itself. Unknown keys and invalid values
raise `UserError` naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from attention_core import ModelConfig
from flows.errors import UserError


class _Section(BaseModel):
    # Attribute docstrings describe the fields of `model` (attention_core's ModelConfig, a plain
    # dataclass) in the JSON schema and the Prefect UI form; numbers given for a string key
    # (`run_name: 2024` in YAML) are that string, not an error.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True,
                              coerce_numbers_to_str=True)


class DataConfig(_Section):
    source: str = Field(
        "python-stdlib",
        description="Corpus: 'python-stdlib' (the running interpreter's top-level stdlib modules), "
        "a path or glob of text/.jsonl/.json/.csv/.parquet files, 'hf:owner/name', or a remote URI.",
    )
    text_column: str = Field("text", description="Column holding the text in jsonl/json/csv/parquet/hf sources.")
    tokenizer: Literal["char", "byte", "bpe"] = Field("char", description="char, byte (256 values) or bpe (byte-level BPE).")
    vocab_size: int = Field(4096, ge=260, description="Target vocabulary size of the bpe tokenizer (ignored by char and byte).")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of the corpus held out for validation.")
    decode_errors: Literal["strict", "replace"] = Field(
        "strict", description="What to do with bytes that are not UTF-8: fail naming the file ('strict') or replace them."
    )
    config: str | None = Field(None, description="Hugging Face dataset config name (hf: sources).")
    split: str = Field("train", description="Hugging Face dataset split (hf: sources).")
    bpe_train_bytes: int | None = Field(
        16_000_000, ge=1_000_000,
        description="Train the bpe tokenizer on about this many bytes of the training split, spread evenly over "
        "it (None: all of it). Merges for a few thousand tokens settle well within the default; raise it for "
        "vocabularies of tens of thousands.",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes for tokenization; default: all cores (fewer for corpora under 8 MB each)."
    )
    timeout_s: float = Field(
        7200, gt=0, description="Time limit of the prepare_dataset stage in seconds (default 2 h): past it the "
        "stage stops, nothing half-written is published, and the run fails naming the stage (not retried)."
    )


class TrainSection(_Section):
    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    optimizer: Literal["adamw", "muon"] = Field(
        "muon", description="muon: Muon (train.muon_lr) for the blocks' matrices and AdamW (train.lr) for "
        "embeddings, head, norms and biases; or adamw for all. Muon needs train.strategy=ddp: under fsdp the "
        "default is adamw.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (AdamW's).")
    min_lr: float = Field(2e-4, ge=0, description="Learning rate at the end of the decay.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    schedule: Literal["cosine", "wsd"] = Field(
        "wsd", description="After warmup: cosine decay to min_lr, or wsd (warmup-stable-decay): the peak "
        "held, then linear to min_lr over the last train.decay_fraction of max_steps.")
    decay_fraction: float = Field(0.4, ge=0, le=1, description="wsd: the share of max_steps spent decaying.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate (train.optimizer=muon); the "
                           "schedule scales it with train.lr.")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's (Nesterov) momentum.")
    muon_weight_decay: float = Field(0.0, ge=0, description="Muon's decoupled weight decay.")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.99, gt=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0: off).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU when use_gpu).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL); else CPU workers (gloo).")
    cpus_per_worker: int | None = Field(
        None, ge=1, description="CPUs Ray reserves per worker (and its torch threads); default: the "
        "cluster's CPUs divided among the workers, so one CPU worker on a laptop uses every core."
    )
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Data parallelism: DDP or FSDP2.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU.")
    compile: bool = Field(False, description="torch.compile the model.")
    eval_interval: int = Field(100, ge=1, description="Steps between validation-loss estimates.")
    eval_batches: int = Field(10, ge=1, description="Batches per validation-loss estimate.")
    log_interval: int = Field(10, ge=1, description="Steps between metric logs.")
    checkpoint_interval: int = Field(100, ge=1, description="Steps between checkpoints (plus one at the end).")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept by Ray Train.")
    checkpoint_score: Literal["step", "val_loss"] = Field(
        "step", description="Which checkpoints Ray Train keeps: the latest ('step') or the best ('val_loss')."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers: STRICT_SPREAD puts each on its own node."
    )
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from by restarting from the last checkpoint.")
    seed: int = Field(1337, description="Seed for initialisation and batch sampling.")
    ray_address: str | None = Field(
        None, description="Ray cluster to join; unset: RAY_ADDRESS (read by the CLI and the flow), else a local Ray."
    )
    storage_path: str | None = Field(None, description="Where Ray Train keeps checkpoints; default <workdir>/ray_results.")
    run_name: str | None = Field(None, description="Ray Train run name; default derived from the flow run so retries resume.")
    timeout_s: float = Field(
        86400, gt=0, description="Time limit of the train_model stage in seconds (default 24 h): past it the Ray "
        "Train run is stopped (its workers end, its checkpoints stay: rerun with the same run_name to resume) and "
        "the run fails naming the stage (not retried)."
    )
    startup_timeout_s: float = Field(
        600, gt=0, description="How long the Ray Train worker group may wait for its resources, at the start and "
        "after each worker restart (default 10 min; an autoscaler adding nodes, a lost node coming back); past it "
        "the stage fails naming this key. Requests the joined cluster can never place fail at once instead."
    )

    # Not rejected, on purpose: an interval longer than max_steps (the last step always logs, evaluates
    # and checkpoints) and warmup_steps >= max_steps (a short run that stays in warmup: `--set
    # train.max_steps=10` with the default warmup is a normal smoke test).
    @model_validator(mode="before")
    @classmethod
    def _adamw_under_fsdp(cls, data: Any) -> Any:
        """Muon, the default optimizer, orthogonalises whole matrices, which FSDP2 shards: AdamW there."""
        if isinstance(data, Mapping) and data.get("strategy") == "fsdp" and "optimizer" not in data:
            return {**data, "optimizer": "adamw"}
        return data

    @model_validator(mode="after")
    def _check_lr(self) -> "TrainSection":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr: {self.min_lr} is above train.lr={self.lr}")
        if self.optimizer == "muon" and self.strategy == "fsdp":
            raise ValueError("train.optimizer: muon orthogonalises whole matrices, which FSDP2 shards; "
                             "use train.strategy=ddp or train.optimizer=adamw")
        return self


class EvalSection(_Section):
    prompts: list[str] | None = Field(
        None, description="Prompts for generated samples; default (null): three taken from the validation "
        "split (a line's start near 0%, 33% and 66% of it), so they suit whatever the corpus is.",
    )
    max_new_tokens: int = Field(120, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int | None = Field(40, ge=1, description="Sample from the top k tokens.")
    seed: int = Field(1234, description="Seed for samples.")
    batch_size: int = Field(32, ge=1, description="Windows per evaluation batch.")
    max_tokens: int | None = Field(
        None, ge=1, description="Evaluate at most this many validation tokens (None: the whole split)."
    )
    timeout_s: float = Field(
        3600, gt=0, description="Time limit of the evaluate_model stage in seconds (default 1 h); past it the "
        "run fails naming the stage (not retried)."
    )


# MLflow 3.17's rules for names, mirrored so that a bad name fails before training rather than at
# registration: mlflow.utils.validation's _validate_model_name (not blank, no '/' or ':', not a path
# that normalises to another name) and _validate_experiment_name (not empty), the registry file
# store's ban on '%', and the 256 characters of the databases' name columns (PostgreSQL enforces them;
# MLflow's own check allows 500 for experiments). tests/flows/test_config_rules.py holds the mirror to MLflow.
MLFLOW_NAME_MAX = 256


def mlflow_model_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as a registered model name, or None."""
    if not name.strip():
        return "must not be empty"
    if "/" in name or ":" in name:
        return "MLflow forbids '/' and ':' in a registered model name"
    if "%" in name:
        return "MLflow's file store forbids '%' in a registered model name"
    if name == "." or name.startswith(".."):
        return "MLflow refuses a name that reads as a relative path ('.', or starting with '..')"
    if len(name) > MLFLOW_NAME_MAX:
        return f"{len(name)} characters, more than the {MLFLOW_NAME_MAX} MLflow's database holds"
    return None


def mlflow_experiment_name_problem(name: str) -> str | None:
    """Why MLflow would refuse `name` as an experiment name, or None (blank counts as empty here)."""
    if not name.strip():
        return "must not be empty"
    if len(name) > MLFLOW_NAME_MAX:
        return f"{len(name)} characters, more than the {MLFLOW_NAME_MAX} MLflow's database holds"
    return None


class RegistrySection(_Section):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; unset: MLFLOW_TRACKING_URI (read by the CLI and the flow), "
        "else a SQLite store under workdir."
    )
    experiment: str = Field("attention-pipeline", description="MLflow experiment.")
    model_name: str = Field("attention-transformer", description="Registered model name.")
    min_improvement: float = Field(
        0.0, ge=0, description="Bits per byte a challenger must gain over the champion to be promoted."
    )
    timeout_s: float = Field(
        3600, gt=0, description="Time limit of the register_model stage in seconds (default 1 h; it includes "
        "waiting for another run's champion gate and re-evaluating the champion); past it the run fails naming "
        "the stage (not retried)."
    )

    @model_validator(mode="after")
    def _check_names(self) -> "RegistrySection":
        for key, problem in (("model_name", mlflow_model_name_problem(self.model_name)),
                             ("experiment", mlflow_experiment_name_problem(self.experiment))):
            if problem:
                raise ValueError(f"registry.{key}: {getattr(self, key)!r}: {problem}")
        return self


class PipelineConfig(_Section):
    workdir: str = Field("workdir", description="All local state: prepared data, Ray results, MLflow store.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="The model: attention_core's ModelConfig itself (vocab_size comes from the prepared data).",
    )
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    @model_validator(mode="after")
    def _check_model(self) -> "PipelineConfig":
        if self.model.vocab_size is not None:
            raise ValueError("model.vocab_size: set by the prepared data's tokenizer (data.vocab_size for bpe), "
                             "not by the config")
        if not self.model.causal:
            raise ValueError("model.causal: the pipeline trains a language model, which needs causal: true")
        if self.eval.max_tokens is not None and self.eval.max_tokens < self.model.block_size:
            raise ValueError(f"eval.max_tokens: {self.eval.max_tokens} is less than one evaluation window of "
                             f"model.block_size={self.model.block_size}")
        return self

    def tracking_uri(self) -> str:
        """registry.tracking_uri, else a SQLite store under workdir (no server to start)."""
        return self.registry.tracking_uri or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    def storage_path(self) -> str:
        return self.train.storage_path or str(self.workdir_path / "ray_results")


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"unknown config key '{key}'"
    if key == "model" and first["type"] == "value_error" and not msg.startswith("model."):
        msg = f"model.{msg}"  # attention_core's ConfigError names the field without its section
    if msg.startswith((f"{key}:", f"{key}.")) or (not key and ":" in msg):
        return msg
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{key}: {msg}{shown}" if key else msg


def validate_config(data: dict[str, Any]) -> PipelineConfig:
    """Build a PipelineConfig from a plain dict, raising UserError that names the bad key."""
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(f"invalid config: {_format_validation_error(err)}") from None


# --------------------------------------------------------------------------------------- --set overrides
_NULLS = {"null", "none", "~"}


def _field_type(path: list[str]) -> Any:
    """The annotation of a dotted config key, walking sections (pydantic models and the model dataclass)."""
    node: Any = PipelineConfig
    for i, part in enumerate(path):
        if isinstance(node, type) and issubclass(node, BaseModel):
            fields = {name: f.annotation for name, f in node.model_fields.items()}
        elif dataclasses.is_dataclass(node):
            fields = typing.get_type_hints(node)
        else:
            raise UserError(f"unknown config key '{'.'.join(path)}': '{'.'.join(path[:i])}' is not a section")
        if part not in fields:
            raise UserError(f"unknown config key '{'.'.join(path[: i + 1])}'")
        node = fields[part]
    return node


def _parse_value(annotation: Any, raw: str) -> Any:
    """A --set value read by its field's type: strings verbatim (`data.source=123` is the string '123'),
    null/none/~ for an optional key, lists and sections as YAML (`eval.prompts=[a, b]`); numbers and booleans go to
    pydantic as text, which parses them by the field's type (`3e-4` for a float, `true` for a bool)."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else [annotation]
    if optional and raw.strip().lower() in _NULLS:
        return None
    base = kinds[0] if len(kinds) == 1 else None
    if base is str or typing.get_origin(base) is Literal:
        return raw
    structured = base in (list, dict) or dataclasses.is_dataclass(base) or (
        isinstance(base, type) and issubclass(base, BaseModel))
    if typing.get_origin(base) in (list, dict) or structured:
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            return raw  # pydantic reports it, naming the key
    return raw.strip()


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], '3e-4'), the value parsed by the field's type (`_parse_value`)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value, got {item!r}")
    path = key.split(".")
    return path, _parse_value(_field_type(path), raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {item}: '{'.'.join(path[: i + 1])}' is not a section")
            node = child
        node[path[-1]] = value
    return data


# --------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None, *,
                json_text: str | None = None) -> PipelineConfig:
    """YAML file (optional) or a whole config as JSON (`flows submit` ships one), then `key=value`
    overrides -> validated PipelineConfig."""
    data: dict[str, Any] = {}
    if path is not None and json_text is not None:
        raise UserError("give --config or --config-json, not both")
    if json_text is not None:
        try:
            data = json.loads(json_text)
        except json.JSONDecodeError as err:
            raise UserError(f"--config-json is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise UserError("--config-json must hold an object")
    elif path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping at the top level")
        data = dict(loaded or {})
        data.pop("sweep", None)  # the sweep's own section (flows/sweep/spec.py): one file serves run and sweep
    return validate_config(apply_overrides(data, list(overrides or [])))


# --------------------------------------------------------------------------------------- the environment
# Read once, at the edge (the CLI, the flow's entry), into the config; nothing deeper reads os.environ.
FROM_ENVIRONMENT = {("registry", "tracking_uri"): "MLFLOW_TRACKING_URI", ("train", "ray_address"): "RAY_ADDRESS"}


def with_environment(cfg: PipelineConfig, environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """cfg with each unset key of FROM_ENVIRONMENT filled from its environment variable."""
    environ = os.environ if environ is None else environ
    update: dict[str, dict[str, str]] = {}
    for (section, key), variable in FROM_ENVIRONMENT.items():
        if getattr(getattr(cfg, section), key) is None and environ.get(variable):
            update.setdefault(section, {})[key] = environ[variable]
    if not update:
        return cfg
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)
                                  for section, values in update.items()})
