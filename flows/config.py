"""PipelineConfig: the one typed configuration of the pipeline, end to end.

It is read from an optional YAML file, then `--set dotted.key=value` overrides (values parsed as YAML
scalars), and it travels unchanged to Prefect tasks and, as `cfg.model_dump()`, to Ray workers, whose
first line validates it back. Every field carries a description so the Prefect UI form explains itself.
Unknown keys and invalid values raise `UserError` naming the dotted key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flows.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ModelSection(_Section):
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention heads per block.")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads (grouped-query attention); default n_head.")
    n_embd: int = Field(128, ge=1, description="Model width; divisible by n_head.")
    block_size: int = Field(128, ge=2, description="Context length in tokens.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability.")
    pos: Literal["learned", "rope"] = Field("learned", description="Position encoding.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation layer.")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="Feed-forward type.")
    qk_norm: bool = Field(False, description="Normalise queries and keys per head.")
    bias: bool = Field(False, description="Biases in linear and norm layers.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output head.")
    attn_impl: Literal["fused", "explicit"] = Field("fused", description="fused (SDPA kernels) or explicit attention.")

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelSection":
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_embd: {self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_kv_head: {self.n_kv_head} does not divide model.n_head={self.n_head}")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"model.pos: rope needs an even head dimension, got n_embd/n_head={self.n_embd // self.n_head}")
        return self


class TrainSection(_Section):
    max_steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch per worker.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(2e-3, gt=0, description="Peak learning rate.")
    min_lr: float = Field(2e-4, ge=0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(30, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only).")
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
    ray_address: str | None = Field(None, description="Ray cluster to join (else RAY_ADDRESS, else a local Ray).")
    storage_path: str | None = Field(None, description="Where Ray Train keeps checkpoints; default <workdir>/ray_results.")
    run_name: str | None = Field(None, description="Ray Train run name; default derived from the flow run so retries resume.")

    @model_validator(mode="after")
    def _check_lr(self) -> "TrainSection":
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr: {self.min_lr} is above train.lr={self.lr}")
        return self


class EvalSection(_Section):
    prompts: list[str] = Field(
        default_factory=lambda: ["def ", "class Request:\n", "import "],
        description="Prompts for generated samples.",
    )
    max_new_tokens: int = Field(120, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.8, ge=0, description="Sampling temperature (0: greedy).")
    top_k: int | None = Field(40, ge=1, description="Sample from the top k tokens.")
    seed: int = Field(1234, description="Seed for samples.")
    batch_size: int = Field(32, ge=1, description="Windows per evaluation batch.")
    max_tokens: int | None = Field(
        None, ge=1, description="Evaluate at most this many validation tokens (None: the whole split)."
    )


class RegistrySection(_Section):
    experiment: str = Field("attention-pipeline", description="MLflow experiment.")
    model_name: str = Field("attention-transformer", description="Registered model name.")
    min_improvement: float = Field(
        0.0, ge=0, description="Bits per byte a challenger must gain over the champion to be promoted."
    )


class PipelineConfig(_Section):
    workdir: str = Field("workdir", description="All local state: prepared data, Ray results, MLflow store.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def tracking_uri(self) -> str:
        """MLFLOW_TRACKING_URI when set, else a SQLite store under workdir (no server to start)."""
        return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.workdir_path / 'mlflow.db'}"

    def storage_path(self) -> str:
        return self.train.storage_path or str(self.workdir_path / "ray_results")


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
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


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as a YAML scalar."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


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


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """YAML file (optional) + `key=value` overrides -> validated PipelineConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping at the top level")
        data = loaded or {}
    return validate_config(apply_overrides(data, list(overrides or [])))
