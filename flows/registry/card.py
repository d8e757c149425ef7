"""The model card of a registered version: what it was trained on, how, how good it is, and what for.

`model_card_markdown` reads everything from what the run already recorded (its params are the whole
config, its metrics the training and evaluation, its tags the lineage) plus the gate's decision, so the
card says nothing the MLflow run does not. `publish_model_card` writes it as `model_card.md` beside the
version's pyfunc (and as `hf/README.md`, the card Hugging Face tools read, when the version has an
`hf/` export) and puts its gist in the version's description, which the MLflow UI shows on the
version's page. Publishing again writes the same files and description: a retry changes nothing.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flows.data import PreparedData
from flows.evaluate import EvalResult
from flows.masking import mask_uri
from flows.registry.gate import Registration
from flows.registry.tracking import mlflow_client

CARD = "model_card.md"
INTENDED_USE = ("A small research language model: for comparing training recipes, teaching, and "
                "testing a serving stack. It continues text in the style of its training corpus.")
LIMITATIONS = ("Trained on one corpus for a short time: it makes up plausible-looking text with no regard for "
               "truth, repeats itself, and knows nothing outside its corpus. It has had no safety tuning or "
               "evaluation beyond the numbers above; do not use it to make decisions about people.")


def _num(value, fmt: str = ".4f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "–"


def _architecture(params: dict[str, str], num_params: str | None) -> str:
    p = {k.removeprefix("model."): v for k, v in params.items() if k.startswith("model.")}
    heads = p.get("n_head", "?")
    kv = p.get("n_kv_head") if p.get("n_kv_head") not in (None, "None") else heads
    size = f"{p.get('n_layer', '?')} layers × {p.get('n_embd', '?')} dims, {heads} heads ({kv} key/value)"
    parts = [f"{p.get('pos', '?')} positions", p.get("norm", "?"), p.get("mlp", "?") + " MLP"]
    if p.get("qk_norm") == "True":
        parts.append("qk-norm")
    parts.append("tied embeddings" if p.get("tie_embeddings") == "True" else "untied head")
    count = f"; {int(float(num_params)):,} parameters" if num_params else ""
    return f"{size}, context {p.get('block_size', '?')} tokens; {', '.join(parts)}{count}"


def model_card_markdown(reg: Registration, result: EvalResult, data: PreparedData, run, version) -> str:
    """The card of `version` (an MLflow ModelVersion) registered from `run` (an MLflow Run)."""
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    num_params = params.get("model.num_params") or tags.get("model.num_params")
    workers, gpu = params.get("train.num_workers", "1"), params.get("train.use_gpu") == "True"
    steps = params.get("train.max_steps", "?")
    try:
        tokens_per_step = (int(params["train.batch_size"]) * int(params["model.block_size"])
                           * int(params.get("train.grad_accum", 1)) * int(workers))
        tokens = f"{tokens_per_step * int(steps):,}"
    except (KeyError, ValueError):
        tokens = "–"
    wall = metrics.get("stage_seconds.train")
    hardware = f"{workers} Ray Train worker(s), " + ("one GPU each" if gpu else
                                                      f"CPU ({params.get('train.cpus_per_worker', 'auto')} cores each)")
    champion = (f"v{reg.champion_version} at {_num(reg.champion_bits_per_byte)} bits/byte"
                if reg.champion_version is not None else "none before this version")
    samples = "\n".join(f"- `{s.get('prompt', '')!r}` → `{s.get('completion', s.get('sample', ''))[:160]!r}`"
                        for s in result.samples[:3]) or "- (none)"
    lines = [
        f"# {reg.model_name} v{reg.version}", "",
        f"**{reg.decision}**: {_num(result.bits_per_byte)} bits per byte on the validation split "
        f"(champion: {champion}).", "",
        "## Data", "",
        f"- source: `{params.get('data.source', '?')}`", f"- fingerprint: `{data.fingerprint}`",
        f"- tokenizer: {data.tokenizer}, {data.vocab_size} tokens in the vocabulary",
        f"- documents: {data.train_documents:,} train, {data.val_documents:,} validation",
        f"- tokens: {data.train_tokens:,} train, {data.val_tokens:,} validation ({data.split} split)", "",
        "## Model", "", f"- {_architecture(params, num_params)}",
        f"- Hugging Face export: {version.tags.get('hf.architecture', 'none')} "
        f"({version.tags.get('hf.export', 'not exported')})", "",
        "## Training", "",
        f"- steps: {steps}, tokens seen: {tokens}, peak learning rate {params.get('train.lr', '?')}, "
        f"optimizer {params.get('train.optimizer', 'adamw')}",
        f"- wall time: {_num(wall, '.1f') + ' s' if wall is not None else '–'}; hardware: {hardware}",
        f"- throughput: {_num(metrics.get('tokens_per_sec'), ',.0f')} tokens/s (last logged)",
        f"- final train loss {_num(metrics.get('train_loss'))}, val loss estimate {_num(metrics.get('val_loss'))}", "",
        "## Evaluation (whole validation split)", "",
        "| bits per byte | val loss (nats/token) | perplexity | tokens scored |", "|---|---|---|---|",
        f"| {_num(result.bits_per_byte)} | {_num(result.val_loss)} | {_num(result.perplexity, '.2f')} | {result.tokens:,} |",
        "", "Samples (fixed seed):", "", samples, "",
        "## Champion gate", "", f"- method: {reg.method}", f"- decision: {reg.decision}",
        f"- challenger: v{reg.version}, {_num(reg.challenger_bits_per_byte)} bits/byte; champion before: {champion}", "",
        "## Lineage", "",
        f"- MLflow run: `{reg.run_id}` ({run.info.run_name})",
        f"- git commit: `{tags.get('mlflow.source.git.commit', 'unknown')}`"
        + (" (uncommitted changes)" if tags.get("git.dirty") == "true" else ""),
        f"- Prefect flow run: `{tags.get('prefect.flow_run_name', '?')}` (`{tags.get('prefect.flow_run_id', '?')}`)",
        f"- Ray Train run: `{tags.get('ray.run_name', '?')}` under `{tags.get('ray.storage_path', '?')}`",
        f"- versions: torch {tags.get('versions.torch', '?')}, Ray {tags.get('versions.ray', '?')}, "
        f"MLflow {tags.get('versions.mlflow', '?')}, Prefect {tags.get('versions.prefect', '?')}", "",
        "## Intended use", "", INTENDED_USE, "", "## Limitations", "", LIMITATIONS,
    ]
    return mask_uri("\n".join(lines)) + "\n"


def gist(card: str) -> str:
    """The version description: the card's verdict line, then its data, model and evaluation bullets."""
    lines = card.splitlines()
    keep = [lines[2]]
    for heading in ("## Data", "## Model", "## Evaluation (whole validation split)"):
        i = lines.index(heading)
        block = [line for line in lines[i + 2: i + 6] if line.startswith(("- ", "| "))]
        rows = [[cell.strip() for cell in line.strip("| ").split("|")] for line in block if line.startswith("| ")]
        if len(rows) == 2:  # MLflow's description view shows a table's rows as text: one bullet instead
            block = ["- " + ", ".join(f"{name} {value}" for name, value in zip(*rows))]
        keep += ["", f"**{heading.removeprefix('## ')}**", "", *block]
    return "\n".join(keep + ["", f"The whole card: `{CARD}` in this version's artifacts."])


def publish_model_card(tracking_uri: str, reg: Registration, result: EvalResult, data: PreparedData) -> str:
    """Write the card beside the version's model (and hf/README.md) and its gist as the description."""
    from flows.hf_export import HF_DIR

    from flows.registry.versions import logged_model_of

    client = mlflow_client(tracking_uri)
    version = client.get_model_version(reg.model_name, reg.version)
    model_id = version.model_id or logged_model_of(client, reg.run_id).model_id  # a local store drops the link
    card = model_card_markdown(reg, result, data, client.get_run(reg.run_id), version)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CARD).write_text(card)
        client.log_model_artifacts(model_id, tmp)
        if version.tags.get("hf.export") == f"{HF_DIR}/":
            (Path(tmp) / CARD).rename(Path(tmp) / "README.md")
            client.log_model_artifacts(model_id, tmp, artifact_path=HF_DIR)
    client.update_model_version(reg.model_name, reg.version, description=gist(card))
    return card
