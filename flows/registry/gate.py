"""The champion gate: promote a new model version only when it beats the current champion.

The gate compares the challenger with the current champion on the same validation windows when both
use the same tokenizer (re-evaluating the champion), else on their recorded bits per byte (also when the
champion's model pack is gone from the artifact store: the decision's method says so), and moves
the `champion` alias in one call, so there is never more than one champion. A challenger whose bits
per byte is not finite is never promoted, and a champion whose score is not finite (NaN compares false
with everything, so no margin could beat it) loses to any finite challenger. The decision is recorded
on the challenger's version (and its run) as `gate.*` tags, and a retry reuses it while the champion
it was made against is still the champion. Gates of one registered model run one at a time, under
flows/registry/lock.py's champion_lock (`gate_exclusively` below).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.evaluate import EvalResult
from flows.registry.loading import download_model_pack, pack_is_complete
from flows.registry.lock import champion_lock
from flows.registry.tracking import does_not_exist, mlflow_client, set_run_tags
from flows.registry.versions import EVAL_BPB, TOKENIZER_DIGEST, OnStep

CHAMPION, CHALLENGER = "champion", "challenger"
# Steps of the gate, after the version exists (see versions.py): each passed to on_step once done.
DECISION_RECORDED, CHAMPION_MOVED, ALIASES_MOVED = "decision recorded", "champion alias moved", "aliases moved"
GATE = "gate."  # prefix of the champion decision's tags on a model version and on its run


class GateDecision(BaseModel):
    """The champion/challenger comparison recorded on the challenger's model version."""

    promote: bool
    method: str
    challenger_bits_per_byte: float
    champion_version: int | None = None
    champion_bits_per_byte: float | None = None
    challenger_val_loss: float | None = None
    champion_val_loss: float | None = None
    min_improvement: float = 0.0

    @property
    def decision(self) -> str:
        return "promoted" if self.promote else "kept champion"

    def tags(self) -> dict[str, str]:
        out = {f"{GATE}{k}": str(v) for k, v in self.model_dump().items() if k != "promote" and v is not None}
        out[f"{GATE}decision"] = self.decision  # written last: its presence marks a complete record
        return out

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "GateDecision | None":
        if f"{GATE}decision" not in tags:
            return None
        values = {k[len(GATE):]: v for k, v in tags.items() if k.startswith(GATE)}
        values.pop("decision")
        return cls(promote=tags[f"{GATE}decision"] == "promoted", **values)


class Registration(BaseModel):
    """What the register task returns: the version, the gate's decision, and where both are recorded."""

    model_name: str
    version: str
    model_uri: str
    champion: bool
    decision: str
    method: str
    challenger_bits_per_byte: float
    champion_bits_per_byte: float | None = None
    champion_version: int | None = None
    run_id: str
    experiment_id: str


def current_champion(client, name: str):
    """The champion version, or None when there is none; a store that does not answer raises (a
    champion taken for absent would be replaced without a comparison)."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException as err:
        if does_not_exist(err):
            return None
        raise
    return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None


class ChampionArtifactsGone(Exception):
    """The champion's model pack is no longer in the artifact store: it cannot be re-evaluated."""


def _recorded_bits_per_byte(client, version) -> float:
    """A version's own bits per byte: its tag, else its run's metric, else infinity (always beaten)."""
    for key in (EVAL_BPB, "bits_per_byte"):  # "bits_per_byte": versions registered before lineage tags
        if key in version.tags:
            return float(version.tags[key])
    metric = client.get_run(version.run_id).data.metrics.get("eval_bits_per_byte") if version.run_id else None
    return float(metric) if metric is not None else math.inf


def _re_evaluate(cfg, tracking_uri, name, challenger, champion, data, result):
    """(challenger score, champion score) on the same windows of this run's validation split."""
    from flows.evaluate import eval_device, score_split

    tokens, device = data.tokens("val"), eval_device(cfg)  # the device the challenger was evaluated on
    with tempfile.TemporaryDirectory() as tmp:
        champion_uri = f"models:/{name}/{champion.version}"
        try:
            champ_model, tokenizer = download_model_pack(tracking_uri, champion_uri, Path(tmp) / "champion", device)
        except Exception as err:
            if pack_is_complete(tracking_uri, champion_uri):
                raise  # there, but not read this time: the task's retry tries again
            raise ChampionArtifactsGone(f"champion v{champion.version}'s model pack is gone from the "
                                        "artifact store") from err
        block = min(champ_model.config.block_size, result.block_size)  # windows both models can read
        score = dict(block_size=block, batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)
        champ = score_split(champ_model, tokenizer, tokens, **score)
        if block == result.block_size:
            return (result.val_loss, result.bits_per_byte), (champ.val_loss, champ.bits_per_byte)
        chall_model, _ = download_model_pack(tracking_uri, f"models:/{name}/{challenger.version}",
                                             Path(tmp) / "challenger", device)
        chall = score_split(chall_model, tokenizer, tokens, **score)
        return (chall.val_loss, chall.bits_per_byte), (champ.val_loss, champ.bits_per_byte)


def decide(cfg: PipelineConfig, tracking_uri: str, challenger, champion, *, data: PreparedData,
           result: EvalResult) -> GateDecision:
    """Promote when the challenger's bits per byte beat the champion's by registry.min_improvement;
    never a challenger whose score is not finite, always a finite one against a non-finite champion."""
    margin = cfg.registry.min_improvement
    if champion is None:
        promote = math.isfinite(result.bits_per_byte)  # evaluation already refuses a non-finite one
        method = "no champion" if promote else _not_finite("no champion", result.bits_per_byte)
        return GateDecision(promote=promote, method=method, challenger_bits_per_byte=result.bits_per_byte,
                            challenger_val_loss=result.val_loss, min_improvement=margin)
    common = dict(champion_version=int(champion.version), min_improvement=margin)
    method = "recorded bits per byte (the tokenizers differ)"
    if champion.tags.get(TOKENIZER_DIGEST) == challenger.tags.get(TOKENIZER_DIGEST):
        try:
            (c_loss, c_bpb), (k_loss, k_bpb) = _re_evaluate(cfg, tracking_uri, cfg.registry.model_name,
                                                            challenger, champion, data, result)
        except ChampionArtifactsGone as gone:  # else every later registration would fail here
            method = f"recorded bits per byte ({gone})"
        else:
            promote, method = _compare(c_bpb, k_bpb, margin, "re-evaluated champion on the same validation split")
            return GateDecision(promote=promote, method=method,
                                challenger_bits_per_byte=c_bpb, champion_bits_per_byte=k_bpb,
                                challenger_val_loss=c_loss, champion_val_loss=k_loss, **common)
    k_bpb = _recorded_bits_per_byte(mlflow_client(tracking_uri), champion)
    promote, method = _compare(result.bits_per_byte, k_bpb, margin, method)
    return GateDecision(promote=promote, method=method,
                        challenger_bits_per_byte=result.bits_per_byte, champion_bits_per_byte=k_bpb, **common)


def _compare(challenger_bpb: float, champion_bpb: float, margin: float, method: str) -> tuple[bool, str]:
    """(promote, method): a finite challenger beats a champion by `margin`, and any champion whose score
    is not finite (NaN, or infinity when it has none recorded); a non-finite challenger never wins."""
    if not math.isfinite(challenger_bpb):
        return False, _not_finite(method, challenger_bpb)
    if not math.isfinite(champion_bpb):
        return True, f"{method}; champion's bits per byte is {champion_bpb:g}, not finite: replaced"
    return challenger_bpb < champion_bpb - margin, method


def _not_finite(method: str, challenger_bpb: float) -> str:
    return f"{method}; challenger's bits per byte is {challenger_bpb:g}, not finite: never promoted"


def champion_gate(cfg: PipelineConfig, tracking_uri: str, version, *, data: PreparedData,
                  result: EvalResult, on_step: OnStep | None = None) -> Registration:
    """Decide (or reuse this version's recorded decision), record it, then move the aliases.

    A recorded decision stands while the champion it was made against is still the champion (or is
    this version, promoted by an earlier attempt); otherwise it is made again against the new one.
    """
    on_step = on_step or (lambda point: None)
    client = mlflow_client(tracking_uri)
    name = cfg.registry.model_name
    version = client.get_model_version(name, version.version)  # fresh tags
    champion = current_champion(client, name)
    champion_now = int(champion.version) if champion is not None else None
    decision = GateDecision.from_tags(version.tags)
    if decision is None or (decision.champion_version != champion_now and champion_now != int(version.version)):
        decision = decide(cfg, tracking_uri, version, champion, data=data, result=result)
        for key, value in decision.tags().items():
            client.set_model_version_tag(name, version.version, key, value)
        set_run_tags(tracking_uri, version.run_id, decision.tags())
        client.update_model_version(name, version.version, description=_describe(decision))
        on_step(DECISION_RECORDED)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)  # one update: never two champions
        on_step(CHAMPION_MOVED)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    on_step(ALIASES_MOVED)
    run = client.get_run(version.run_id)
    return Registration(model_name=name, version=str(version.version),
                        model_uri=f"models:/{name}/{version.version}", champion=decision.promote,
                        decision=decision.decision, method=decision.method,
                        challenger_bits_per_byte=decision.challenger_bits_per_byte,
                        champion_bits_per_byte=decision.champion_bits_per_byte,
                        champion_version=decision.champion_version, run_id=version.run_id,
                        experiment_id=run.info.experiment_id)


def _describe(d: GateDecision) -> str:
    if d.champion_version is None:
        return f"{d.decision}: no champion before; {d.challenger_bits_per_byte:.4f} bits/byte"
    return (f"{d.decision}: {d.challenger_bits_per_byte:.4f} bits/byte against champion "
            f"v{d.champion_version}'s {d.champion_bits_per_byte:.4f} ({d.method}; "
            f"min improvement {d.min_improvement})")


def gate_exclusively(cfg, tracking_uri: str, version, *, data, result,
                     on_locked: Callable[[], None] | None = None,
                     on_step: Callable[[str], None] | None = None, **lock_options):
    """champion_gate under champion_lock, so the champion it compares against is the one of now.

    on_locked (tests only) runs once the lock is held and before the champion is read: a test holds
    the lock there while another gate tries to take it. on_step (fault tests only): see champion_gate.
    """
    with champion_lock(tracking_uri, cfg.registry.model_name, **lock_options):
        if on_locked is not None:
            on_locked()
        return champion_gate(cfg, tracking_uri, version, data=data, result=result, on_step=on_step)
