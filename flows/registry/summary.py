"""What a person reads after a run: the Prefect `pipeline-summary` markdown and the MLflow run's URL.

The summary puts the evaluation's numbers, the champion comparison and the decision on one page,
with a link to the run in the MLflow UI, the run's lineage (data fingerprint, Ray Train run,
checkpoint) as the register task knows it, and where the run's time went (flows/timing.py). Both are published, so a URI's credentials are masked.
"""

from __future__ import annotations

from flows.evaluate import EvalResult
from flows.registry.gate import Registration
from flows.masking import mask_uri
from flows.timing import stage_table


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server's, else the `mlflow ui` the CLI suggests
    (credentials in the tracking URI masked: the URL is published)."""
    local = not tracking_uri.startswith(("http://", "https://"))
    base = "http://127.0.0.1:5000" if local else mask_uri(tracking_uri).rstrip("/")
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def summary_markdown(reg: Registration, result: EvalResult, *, url: str, lineage: dict[str, str],
                     stages: dict[str, float] | None = None) -> str:
    """The Prefect `pipeline-summary` artifact: metrics, the champion comparison, the MLflow run and
    the stage times (seconds per stage, in pipeline order)."""
    def num(x: float | None) -> str:
        return "–" if x is None else f"{x:.4f}"

    lines = [f"# {reg.model_name} v{reg.version}: {reg.decision}", "",
             "| metric (validation split) | value |", "|---|---|",
             f"| loss (nats/token) | {num(result.val_loss)} |", f"| perplexity | {num(result.perplexity)} |",
             f"| bits per byte | {num(result.bits_per_byte)} |",
             f"| tokens scored | {result.tokens} ({result.windows} windows of {result.block_size}) |"]
    if result.num_params is not None:
        lines.append(f"| parameters (nanoGPT's count: all but position embeddings) | {result.num_params:,} |")
    lines += ["", "## Champion comparison", "", f"Method: {reg.method}.", "",
              "| | version | bits per byte |", "|---|---|---|",
              f"| challenger | v{reg.version} | {num(reg.challenger_bits_per_byte)} |"]
    if reg.champion_version is not None:
        lines.append(f"| champion before | v{reg.champion_version} | {num(reg.champion_bits_per_byte)} |")
    lines += ["", f"Decision: **{reg.decision}**; `{reg.model_name}@champion` is "
              f"{'now this version' if reg.champion else f'still v{reg.champion_version}'}.", "",
              "## MLflow", "", f"- run: [{reg.run_id}]({url})", f"- model: `{reg.model_uri}`"]
    lines += [f"- {k}: `{v}`" for k, v in lineage.items()]
    if stages:
        lines += ["", "## Stage times", "", *stage_table(stages)]
    return mask_uri("\n".join(lines)) + "\n"  # lineage may hold URIs (storage paths, data sources)
