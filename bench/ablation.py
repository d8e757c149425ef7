"""Learning per step on tinyshakespeare (char): nanoGPT's CPU baseline, each change alone, the recipe.

Trains attention_core's plain `train_step` (no Ray, no Prefect) on the char-tokenized corpus, the last
10% held out as validation (nanoGPT's split), and prints, per variant, the validation loss every
--eval-every steps over the whole validation split (consecutive windows, the pipeline's
`eval_val_loss`), the first step at which it reaches --target (interpolated between evaluations),
the median wall time of a training step, and the wall time to the target counting training steps
only. Validation loss at a fixed step is what compares variants (it does not depend on the machine's
load); the times are for a quiet machine only.

    python bench/ablation.py --data ../shared/data/tinyshakespeare.txt --variants nanogpt
    python bench/ablation.py --data ../shared/data/tinyshakespeare.txt --variants base,muon --steps 1000

A variant is a name in VARIANTS (the base settings plus its changes: model fields and trainer
settings), or several such names and key=value settings joined by '+' (`muon+rope+muon_lr=0.04`). `base` is nanoGPT's CPU run (4 layers, 4 heads, 128 dims, block 64, batch 12, AdamW lr
1e-3, beta2 0.99, warmup 100, cosine to min_lr 1e-4, dropout 0) with its schedule ending at --steps;
`nanogpt` is the same with nanoGPT's 2000-step schedule. --set key=value changes any setting of
every variant run (e.g. --set seed=2).

`make run`'s own setup: `--data python-stdlib` prepares the pipeline's default corpus with the pipeline's
own prep (prepare_dataset, char tokenizer, its content-hash document split) in a temporary workdir, and
`--base default` starts every variant from the pipeline's default model and trainer settings
(flows/config.py) instead of nanoGPT's:

    python bench/ablation.py --data python-stdlib --base default --steps 300 --variants base,muon,rope
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_core import ModelConfig, Transformer, configure_optimizer, lr_at, train_step  # noqa: E402

TARGET = 1.886  # nanoGPT's CPU run: val loss at step 2000 (README, ../shared/ANCHORS.md)


@dataclass(frozen=True)
class Settings:
    """One training run: the model's fields and the trainer's settings (nanoGPT's CPU run by default)."""

    model: dict = field(default_factory=lambda: dict(n_layer=4, n_head=4, n_embd=128, block_size=64))
    batch_size: int = 12
    steps: int | None = None  # schedule length; None: the run's --steps
    optimizer: str = "adamw"
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_fraction: float = 0.4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    precision: str = "fp32"  # or bf16: autocast on the CPU (train.precision)
    compile: bool = False  # torch.compile the model (train.compile); its cost shows as first_step_s
    seed: int = 1337


MUON = dict(optimizer="muon", muon_lr=0.02)
# each change alone on top of `base`; the recipe last
VARIANTS: dict[str, dict] = {
    "nanogpt": dict(steps=2000),
    "base": {},
    "lr2e-3": dict(lr=2e-3, min_lr=2e-4),
    "muon": MUON,
    "rope": dict(model=dict(pos="rope")),
    "qk_norm": dict(model=dict(qk_norm=True)),
    "relu2": dict(model=dict(mlp="relu2")),
    "zero_init": dict(model=dict(zero_init_proj=True)),
    "untied": dict(model=dict(tie_embeddings=False)),
    "softcap": dict(model=dict(logit_softcap=15.0)),
    "rmsnorm": dict(model=dict(norm="rmsnorm")),
    "wsd": dict(schedule="wsd", decay_fraction=0.4),
    "adamw": dict(optimizer="adamw"),  # with cosine: the pipeline's defaults before Muon and wsd (--base default)
    "cosine": dict(schedule="cosine"),
    "warmup20": dict(warmup_steps=20),
    "batch24": dict(batch_size=24),
    "lr3e-3": dict(lr=3e-3, min_lr=3e-4),
    "block128": dict(model=dict(block_size=128), batch_size=6),  # the same tokens per step
    "block32": dict(model=dict(block_size=32), batch_size=24),
    "bf16": dict(precision="bf16"),
    "compile": dict(compile=True),
}


def pipeline_settings() -> Settings:
    """`attention-pipeline run`'s defaults (flows/config.py): its model section and trainer settings."""
    from flows.config import PipelineConfig

    cfg = PipelineConfig()
    tc = cfg.train
    model = {k: v for k, v in cfg.model.to_dict().items() if k != "vocab_size"}
    # every trainer setting of the same name but precision: the pipeline's auto is fp32 on the CPU
    trainer = {f.name: getattr(tc, f.name) for f in fields(Settings) if f.name in type(tc).model_fields
               and f.name != "precision"}
    return Settings(model=model, **trainer)


BASES = {"nanogpt": Settings, "default": pipeline_settings}


def variant(name: str, overrides: list[str] = (), base: str = "nanogpt") -> Settings:
    """The settings of a variant name: VARIANTS' names and key=value settings joined by '+', applied in
    order on top of the base's settings (`muon+rope`, `muon+muon_lr=0.04+model.qk_norm=true`), then overrides."""
    settings = BASES[base]()
    for part in [*name.split("+"), *overrides]:
        if "=" in part:
            key, _, raw = part.partition("=")
            try:
                value = json.loads(raw)  # numbers, true/false/null
            except json.JSONDecodeError:
                value = raw  # a word: rope, wsd
            changes = {"model": {key.removeprefix("model."): value}} if key.startswith("model.") else {key: value}
        elif part in VARIANTS:
            changes = VARIANTS[part]
        else:
            raise SystemExit(f"{part!r}: neither a variant ({', '.join(VARIANTS)}) nor key=value")
        unknown = set(changes) - {f.name for f in fields(Settings)}
        if unknown:
            raise SystemExit(f"{part!r}: unknown setting {sorted(unknown)}")
        settings = replace(settings, **{k: v for k, v in changes.items() if k != "model"},
                           model={**settings.model, **changes.get("model", {})})
    return settings


def load_corpus(path: Path) -> tuple[torch.Tensor, torch.Tensor, int]:
    """nanoGPT's shakespeare_char: the sorted characters as the vocabulary, the last 10% as validation."""
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.long)
    n = int(len(ids) * 0.9)
    return ids[:n], ids[n:], len(chars)


def load_prepared(source: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The pipeline's own prep of data.source with its defaults (char tokenizer, its split), in a temporary workdir."""
    from flows.config import PipelineConfig
    from flows.data.prepare import prepare_dataset

    with tempfile.TemporaryDirectory(prefix="ablation-") as workdir:
        data = prepare_dataset(PipelineConfig(workdir=workdir, data=dict(source=source)))
        train, val = (torch.from_numpy(data.tokens(split).astype(np.int64)) for split in ("train", "val"))
    return train, val, data.vocab_size


@torch.no_grad()
def val_loss(model: Transformer, val: torch.Tensor, block_size: int, batch: int = 128) -> float:
    """Mean next-token loss over consecutive windows of the whole split (the pipeline's eval_val_loss)."""
    model.eval()
    n = (len(val) - 1) // block_size
    x_all = val[: n * block_size].view(n, block_size)
    y_all = val[1: n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, batch):
        logits, _ = model(x_all[i:i + batch])
        total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y_all[i:i + batch].reshape(-1),
                                       reduction="sum"))
    model.train()
    return total / (n * block_size)


def nanogpt_param_count(model: Transformer) -> int:
    """nanoGPT's get_num_params(): every parameter (a tied matrix once) except position embeddings."""
    return model.num_params(non_embedding=False) - (model.wpe.weight.numel() if model.wpe is not None else 0)


def run(name: str, s: Settings, train: torch.Tensor, val: torch.Tensor, vocab: int, steps: int,
        eval_every: int, target: float = TARGET) -> dict:
    max_steps = s.steps or steps
    run_steps = min(steps, max_steps)
    torch.manual_seed(s.seed)
    model = Transformer(ModelConfig(vocab_size=vocab, **s.model))
    optimizer = configure_optimizer(model, s.lr, s.weight_decay, betas=(s.beta1, s.beta2),
                                    optimizer=s.optimizer, muon_lr=s.muon_lr, muon_momentum=s.muon_momentum,
                                    muon_weight_decay=s.muon_weight_decay)
    T = model.config.block_size
    step_model = torch.compile(model) if s.compile else model
    autocast = torch.bfloat16 if s.precision == "bf16" else None
    gen = torch.Generator().manual_seed(s.seed)
    offsets = torch.arange(T + 1)
    curve, times = {}, []
    for step in range(run_steps):
        starts = torch.randint(len(train) - T - 1, (s.batch_size, 1), generator=gen)
        xy = train[starts + offsets]  # (B, T + 1): random windows, as nanoGPT's get_batch
        lr = lr_at(step, lr=s.lr, min_lr=s.min_lr, warmup_steps=s.warmup_steps, max_steps=max_steps,
                   schedule=s.schedule, decay_fraction=s.decay_fraction)
        t0 = time.perf_counter()
        result = train_step(step_model, optimizer, [(xy[:, :-1], xy[:, 1:])], lr=lr, grad_clip=s.grad_clip,
                            autocast_dtype=autocast)
        times.append(time.perf_counter() - t0)
        done = step + 1
        if done % eval_every == 0 or done == run_steps:
            curve[done] = val_loss(model, val, T)
            print(f"  {name} step {done}: train {result.loss:.4f} val {curve[done]:.4f}", file=sys.stderr, flush=True)
    ms = statistics.median(times[1:] or times) * 1000  # the first step carries compilation
    reached = steps_to(curve, target)
    return dict(name=name, settings=s.__dict__, params=nanogpt_param_count(model), curve=curve,
                ms_per_step=ms, first_step_s=times[0], tokens_per_step=s.batch_size * T, steps_to_target=reached,
                seconds_to_target=None if reached is None else reached * ms / 1000)


def steps_to(curve: dict[int, float], target: float) -> float | None:
    """The first step at which the loss reaches target, linearly interpolated between evaluations."""
    prev_step, prev = 0, float("inf")
    for step, loss in sorted(curve.items()):
        if loss <= target:
            if prev == float("inf"):
                return float(step)
            return prev_step + (prev - target) / (prev - loss) * (step - prev_step)
        prev_step, prev = step, loss
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt",
                   help="a text file (nanoGPT's split), or python-stdlib (the pipeline's default corpus and prep)")
    p.add_argument("--base", choices=BASES, default="nanogpt", help="the settings variants start from: nanoGPT's "
                   "CPU run, or the pipeline's defaults (flows/config.py)")
    p.add_argument("--target", type=float, default=TARGET, help="the val loss whose first step is reported")
    p.add_argument("--variants", default="base", help=f"comma-separated names: {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=1000, help="steps per run (and the schedule's length, "
                   "unless a variant sets its own)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--report", nargs="*", type=int, default=[500, 1000], help="steps shown as table columns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a setting of every variant")
    p.add_argument("--json", type=Path, help="append each run's result as one JSON line")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    train, val, vocab = load_prepared(str(args.data)) if str(args.data) == "python-stdlib" else load_corpus(args.data)
    print(f"torch {torch.__version__}, {args.threads} threads; {len(train):,} train and {len(val):,} val "
          f"tokens, vocab {vocab}; target {args.target}; base {args.base}")
    cols = " | ".join(f"val@{r}" for r in args.report)
    print(f"| variant | params | {cols} | final val | steps to {args.target} | ms/step | s to {args.target} |")
    print("|---|---:|" + "---:|" * (len(args.report) + 4))
    for name in args.variants.split(","):
        result = run(name, variant(name, args.set, args.base), train, val, vocab, args.steps, args.eval_every,
                     args.target)
        c = result["curve"]
        at = " | ".join(f"{c[r]:.4f}" if r in c else "-" for r in args.report)
        final = c[max(c)]
        reach = result["steps_to_target"]
        reach_s = "-" if reach is None else f"{reach:.0f}"
        secs = "-" if reach is None else f"{result['seconds_to_target']:.1f}"
        print(f"| {name} | {result['params']:,} | {at} | {final:.4f} @{max(c)} | {reach_s} | "
              f"{result['ms_per_step']:.1f} | {secs} |", flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**result, "set": args.set}) + "\n")


if __name__ == "__main__":
    main()
