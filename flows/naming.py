"""Run names: what tells two runs (or two trials of a sweep) apart, beyond the minute they started.

Kept apart from the Prefect flow so that a sweep's trials, which run in Ray actors, name their runs
without importing Prefect.
"""

from __future__ import annotations

from flows.config import PipelineConfig
from flows.data import parse_source

# The settings that change training the most, in that order, with the short names a run name gives them
# when they differ from the defaults (n_layer, n_embd and the tokenizer are in every name already).
NAMED_SETTINGS = {"train.lr": "lr", "train.optimizer": "opt", "train.max_steps": "steps", "train.batch_size": "bs",
                  "model.block_size": "ctx", "model.n_head": "heads", "model.n_kv_head": "kv", "model.pos": "pos",
                  "model.norm": "norm", "model.mlp": "mlp", "train.schedule": "sched", "train.weight_decay": "wd",
                  "train.grad_accum": "accum", "train.num_workers": "workers", "train.seed": "seed"}
MAX_SETTINGS_CHARS = 32  # of the settings part; what does not fit is counted as "+N"


def short_value(value) -> str:
    """3e-3 rather than 0.003: learning rates read as they are usually written; 0.0201 rather than
    0.0200739 (a sampled value)."""
    if isinstance(value, float) and value and abs(value) < 0.01:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def changed_for_name(cfg: PipelineConfig) -> str:
    """NAMED_SETTINGS that differ from the defaults, e.g. "lr=3e-3,bs=8+2" (2 more did not fit)."""
    defaults = PipelineConfig()

    def value(c: PipelineConfig, key: str):
        section, field = key.split(".")
        return getattr(getattr(c, section), field)

    parts = [f"{label}={short_value(value(cfg, key))}" for key, label in NAMED_SETTINGS.items()
             if value(cfg, key) != value(defaults, key)]
    shown: list[str] = []
    for part in parts:
        if len(",".join([*shown, part])) > MAX_SETTINGS_CHARS:
            break
        shown.append(part)
    return ",".join(shown) + (f"+{len(parts) - len(shown)}" if len(parts) > len(shown) else "")


def run_name_for(cfg: PipelineConfig, when) -> str:
    """<dataset>-<tokenizer>-<n_layer>x<n_embd>[-<changed settings>]-<UTC date and time>, e.g.
    python-stdlib-char-4x128-lr=3e-3,steps=500-20250101-0200: what tells two runs apart, beyond the minute."""
    m = cfg.model
    changed = changed_for_name(cfg)
    return (f"{parse_source(cfg.data.source).label}-{cfg.data.tokenizer}-{m.n_layer}x{m.n_embd}-"
            f"{changed + '-' if changed else ''}{when:%Y%m%d-%H%M}")
