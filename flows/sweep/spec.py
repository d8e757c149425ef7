"""What a sweep searches and how: `SweepConfig`, and the search specs it is given (`train.lr=loguniform:1e-4:1e-2`).

A sweep is the pipeline's config (the base every trial starts from) plus a `sweep:` section of the same
YAML file, or the `flows sweep` options on top of it. A search spec names a config key and a space:
`choice:a,b,c` (each value read by the key's type, as `--set` reads it), `uniform:LO:HI`,
`loguniform:LO:HI` (floats) or `int:LO:HI` (integers, both ends included). `check_sweep` validates it
all before anything starts: every key exists and may be searched, every choice and both ends of every
range make a valid config on their own, the metric is one the workers report. Everything here is
plain data; `tune_space` turns the specs into Ray Tune's sample domains.
"""

from __future__ import annotations

import hashlib
import json
import math
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flows.config import PipelineConfig, _field_type, _parse_value, validate_config
from flows.errors import UserError

KINDS = ("choice", "uniform", "loguniform", "int")
METRICS = ("val_loss", "train_loss")  # what the workers report to Tune at every evaluation (lower is better)
# Keys no trial may differ in: the data is prepared once for all trials, the final evaluation and the
# registry act on the best trial only, and where a trial's checkpoints live is the sweep's business.
NOT_SEARCHABLE = {"workdir": "the sweep's state lives there", "data": "the data is prepared once for all trials",
                  "eval": "only the best trial is evaluated", "registry": "only the best trial is registered",
                  "train.run_name": "each trial's Ray Train run is named by the sweep",
                  "train.storage_path": "all trials keep their checkpoints under one storage path",
                  "train.ray_address": "all trials run on one cluster"}


class SweepConfig(BaseModel):
    """The `sweep:` section of a config file, or the `flows sweep` options."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    search: dict[str, str] = Field(default_factory=dict, description="Config key -> search spec "
                                   "(choice:a,b | uniform:LO:HI | loguniform:LO:HI | int:LO:HI).")
    trials: int = Field(8, ge=1, description="Trials to sample.")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once; default: as many as the cluster "
                                       "holds (its CPUs, or GPUs, over one trial's workers).")
    scheduler: Literal["asha", "fifo"] = Field("asha", description="asha: stop poor trials early at each "
                                               "rung; fifo: run every trial to the end.")
    searcher: Literal["random", "optuna"] = Field("random", description="random search, or Optuna's TPE "
                                                  "(the optuna extra).")
    metric: Literal["val_loss", "train_loss"] = Field("val_loss", description="What the sweep minimises.")
    grace_period: int | None = Field(None, ge=1, description="ASHA: steps every trial runs before it can be "
                                     "stopped; default: the first evaluation (train.eval_interval).")
    reduction_factor: int = Field(2, ge=2, description="ASHA: a rung keeps the best 1/reduction_factor of "
                                  "the trials that reach it.")
    seed: int = Field(0, description="Seed of the searcher: the same sweep samples the same trials.")
    name: str | None = Field(None, description="The sweep's name; default: derived from the base config and "
                             "this section, so the same command resumes the same sweep.")
    timeout_s: float = Field(7 * 86400, gt=0, description="Time limit of the run_trials stage in seconds "
                             "(default 7 days); past it the sweep stops (run it again to resume).")


class Dimension(BaseModel):
    """One searched key: `kind` with its `values` (choice) or `low`/`high` (ranges)."""

    key: str
    kind: Literal["choice", "uniform", "loguniform", "int"]
    values: list[Any] = []
    low: float | None = None
    high: float | None = None

    def spec(self) -> str:
        if self.kind == "choice":
            return "choice:" + ",".join(str(v) for v in self.values)
        return f"{self.kind}:{_num(self.low)}:{_num(self.high)}"


def _num(x: float | None) -> str:
    return f"{x:g}" if x is not None else ""


def _searchable(key: str) -> None:
    for prefix, why in NOT_SEARCHABLE.items():
        if key == prefix or key.startswith(prefix + "."):
            raise UserError(f"--search {key}: cannot be searched ({why})")
    try:
        _field_type(key.split("."))
    except UserError as err:
        raise UserError(f"--search {key}: {err}") from None


def _base_kind(key: str) -> type | None:
    """int, float, or None (anything else) for a config key."""
    annotation = _field_type(key.split("."))
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return args[0] if len(args) == 1 and args[0] in (int, float) else None


def parse_dimension(key: str, spec: str) -> Dimension:
    """'train.lr', 'loguniform:1e-4:1e-2' -> Dimension, or UserError naming the key and the spec."""
    key = key.strip()
    _searchable(key)
    kind, _, rest = spec.strip().partition(":")
    where = f"--search {key}={spec}"
    if kind not in KINDS:
        raise UserError(f"{where}: unknown kind {kind!r}; use one of {', '.join(k + ':' for k in KINDS)}")
    if kind == "choice":
        raw = [v.strip() for v in rest.split(",")]
        if not rest.strip() or any(not v for v in raw):
            raise UserError(f"{where}: choice needs values separated by commas, e.g. choice:64,128")
        annotation = _field_type(key.split("."))
        return Dimension(key=key, kind="choice", values=[_typed(annotation, v, key) for v in raw])
    parts = rest.split(":")
    if len(parts) != 2:
        raise UserError(f"{where}: {kind} needs LO:HI, e.g. {kind}:{'1:8' if kind == 'int' else '1e-4:1e-2'}")
    base = _base_kind(key)
    if base is None or (kind != "int" and base is int):
        wanted = "a number" if kind == "int" else "a float (use int:LO:HI for an integer key)"
        raise UserError(f"{where}: {kind} needs {wanted} key; {key} is not (use choice:)")
    try:
        low, high = (int(p) if kind == "int" else float(p) for p in parts)
    except ValueError:
        raise UserError(f"{where}: LO and HI must be {'integers' if kind == 'int' else 'numbers'}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise UserError(f"{where}: LO must be below HI")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform needs LO > 0")
    return Dimension(key=key, kind=kind, low=low, high=high)


def _typed(annotation: Any, raw: str, key: str) -> Any:
    """A choice value as its key's type reads it (JSON-friendly: what Tune and MLflow will see)."""
    value = _parse_value(annotation, raw)
    base = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    try:
        if base[0] is int and isinstance(value, str):
            return int(value)
        if base[0] is float and isinstance(value, str):
            return float(value)
        if base[0] is bool and isinstance(value, str):
            return {"true": True, "false": False}[value.lower()]
    except (ValueError, KeyError):
        raise UserError(f"--search {key}: choice value {raw!r} is not a valid {base[0].__name__}") from None
    return value


def parse_searches(items: list[str]) -> dict[str, str]:
    """['train.lr=loguniform:1e-4:1e-2', ...] -> {key: spec} (a later one for the same key wins)."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, spec = item.partition("=")
        if not sep or not key.strip() or not spec.strip():
            raise UserError(f"--search expects KEY=SPEC, e.g. train.lr=loguniform:1e-4:1e-2, got {item!r}")
        out[key.strip()] = spec.strip()
    return out


def trial_config(base: PipelineConfig, params: dict[str, Any]) -> PipelineConfig:
    """The base config with one trial's values (dotted keys) set."""
    data = base.model_dump(mode="json")
    for key, value in params.items():
        node = data
        *sections, field = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[field] = value
    return validate_config(data)


def check_sweep(base: PipelineConfig, sweep: SweepConfig) -> list[Dimension]:
    """The sweep's dimensions, each checked against the base config; UserError (one line) otherwise."""
    if not sweep.search:
        raise UserError("sweep: nothing to search; give --search KEY=SPEC (or sweep.search in the config)")
    dims = [parse_dimension(k, v) for k, v in sweep.search.items()]
    for dim in dims:
        probes = dim.values if dim.kind == "choice" else [dim.low, dim.high]
        for value in probes:
            value = int(value) if dim.kind == "int" else value
            try:
                trial_config(base, {dim.key: value})
            except UserError as err:
                raise UserError(f"--search {dim.key}={dim.spec()}: {value!r} makes an invalid config: "
                                f"{str(err).removeprefix('invalid config: ')}") from None
    if sweep.scheduler == "asha" and sweep.grace_period is not None and sweep.grace_period >= base.train.max_steps:
        raise UserError(f"sweep.grace_period: {sweep.grace_period} steps is not below train.max_steps="
                        f"{base.train.max_steps}: ASHA could never stop a trial")
    if sweep.searcher == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise UserError("sweep.searcher: optuna is not installed; pip install -e '.[optuna]'") from None
    return dims


def sweep_name(base: PipelineConfig, sweep: SweepConfig) -> str:
    """sweep.name, else 'sweep-<12 hex>' of the base config's training settings and the sweep section:
    the same command names the same sweep (and so resumes it)."""
    if sweep.name:
        return sweep.name
    material = {"base": base.model_dump(mode="json", exclude={"registry": {"tracking_uri"},
                                                              "train": {"ray_address"}}),
                "sweep": sweep.model_dump(mode="json", exclude={"max_concurrent", "timeout_s"})}
    return "sweep-" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]


def load_sweep(path: str | None, searches: list[str], **options: Any) -> SweepConfig:
    """The `sweep:` section of the config file at `path` (if any), with the command line on top:
    `searches` (KEY=SPEC) merged into its search, `options` (those not None) replacing its fields."""
    from pathlib import Path

    import yaml
    from pydantic import ValidationError

    section: dict[str, Any] = {}
    if path is not None and Path(path).is_file():
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        section = dict(loaded.get("sweep") or {}) if isinstance(loaded, dict) else {}
    section["search"] = {**(section.get("search") or {}), **parse_searches(searches)}
    section.update({k: v for k, v in options.items() if v is not None})
    try:
        return SweepConfig.model_validate(section)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise UserError(f"unknown sweep key 'sweep.{key}'") from None
        raise UserError(f"invalid sweep: sweep.{key}: {first['msg']} (got {first.get('input')!r})") from None


def tune_space(dims: list[Dimension]) -> dict[str, Any]:
    """Ray Tune's search space: {dotted key: sample domain}."""
    from ray import tune

    space: dict[str, Any] = {}
    for d in dims:
        if d.kind == "choice":
            space[d.key] = tune.choice(d.values)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(d.low, d.high)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(d.low, d.high)
        else:
            space[d.key] = tune.randint(int(d.low), int(d.high) + 1)  # randint excludes its upper end
    return space


