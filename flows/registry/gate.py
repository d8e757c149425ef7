"""The champion gate: promote a new model version only when it beats the current champion.

The gate compares the challenger with the current champion on the same validation windows when both
use the same tokenizer (re-evaluating the champion), else on their recorded bits per byte, and moves
the `champion` alias in one call, so there is never more than one champion. The decision is recorded
on the challenger's version (and its run) as `gate.*` tags, and a retry reuses it while the champion
it was made against is still the champion. Gates of one registered model run one at a time, under
flows/registry/lock.py's champion_lock (gate_exclusively).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.evaluate import EvalResult
from flows.registry.loading import download_model_pack
from flows.registry.tracking import mlflow_client, set_run_tags
from flows.registry.versions import EVAL_BPB, TOKENIZER_DIGEST

CHAMPION, CHALLENGER = "champion", "challenger"
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
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


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
        champ_model, tokenizer = download_model_pack(tracking_uri, f"models:/{name}/{champion.version}",
                                                     Path(tmp) / "champion", device)
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
    """Promote when the challenger's bits per byte beat the champion's by registry.min_improvement."""
    margin = cfg.registry.min_improvement
    if champion is None:
        return GateDecision(promote=True, method="no champion", challenger_bits_per_byte=result.bits_per_byte,
                            challenger_val_loss=result.val_loss, min_improvement=margin)
    common = dict(champion_version=int(champion.version), min_improvement=margin)
    if champion.tags.get(TOKENIZER_DIGEST) == challenger.tags.get(TOKENIZER_DIGEST):
        (c_loss, c_bpb), (k_loss, k_bpb) = _re_evaluate(cfg, tracking_uri, cfg.registry.model_name,
                                                        challenger, champion, data, result)
        return GateDecision(promote=c_bpb < k_bpb - margin, method="re-evaluated champion on the same validation split",
                            challenger_bits_per_byte=c_bpb, champion_bits_per_byte=k_bpb,
                            challenger_val_loss=c_loss, champion_val_loss=k_loss, **common)
    k_bpb = _recorded_bits_per_byte(mlflow_client(tracking_uri), champion)
    return GateDecision(promote=result.bits_per_byte < k_bpb - margin,
                        method="recorded bits per byte (the tokenizers differ)",
                        challenger_bits_per_byte=result.bits_per_byte, champion_bits_per_byte=k_bpb, **common)


def champion_gate(cfg: PipelineConfig, tracking_uri: str, version, *, data: PreparedData,
                  result: EvalResult) -> Registration:
    """Decide (or reuse this version's recorded decision), record it, then move the aliases.

    A recorded decision stands while the champion it was made against is still the champion (or is
    this version, promoted by an earlier attempt); otherwise it is made again against the new one.
    """
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
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version.version)  # one update: never two champions
    client.set_registered_model_alias(name, CHALLENGER, version.version)
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
