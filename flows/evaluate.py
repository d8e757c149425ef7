"""Evaluation of a trained model: validation loss, perplexity, bits per byte, samples and figures.

The validation split is cut into consecutive non-overlapping windows of block_size tokens (the same
windows every time, scored in batches), so two models evaluated on one dataset are compared on
identical text. Bits per byte divides the total negative log-likelihood, in bits, by the UTF-8 bytes
of the scored text, which makes models with different tokenizers comparable. Samples continue the
configured prompts with a fixed seed; the attention figure shows every head of every layer on the
first prompt and its sample. A score that is not finite (a model whose weights diverged) is refused
as a UserError before anything is sampled or logged.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from flows.config import PipelineConfig
from flows.data import PreparedData
from flows.errors import UserError
from flows.timing import StageClock

ATTENTION_TOKENS = 24  # tokens on each axis of the attention heatmaps: more are unreadable
PROMPT_CHARS = 24  # the longest prompt taken from the validation split when eval.prompts is not set


class EvalResult(BaseModel):
    val_loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    windows: int
    block_size: int
    samples: list[dict[str, str]]
    num_params: int | None = None  # nanoGPT's count (`nanogpt_num_params`); logged as model.num_params

    def metrics(self) -> dict[str, float]:
        return {"eval_val_loss": self.val_loss, "eval_perplexity": self.perplexity,
                "eval_bits_per_byte": self.bits_per_byte}

    def tags(self) -> dict[str, str]:
        """How much was scored: bookkeeping, kept out of the metrics (and so out of the UI's charts)."""
        return {"eval.tokens": str(self.tokens), "eval.bytes": str(self.bytes), "eval.windows": str(self.windows)}


class SplitScore(BaseModel):
    """Sums over the scored windows of one split; the metrics follow from them."""

    nll: float  # nats, summed over every scored token
    tokens: int
    bytes: int
    windows: int
    block_size: int

    @property
    def val_loss(self) -> float:
        return self.nll / self.tokens

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / max(self.bytes, 1)


def window_count(n_tokens: int, block_size: int, max_tokens: int | None = None) -> int:
    """Windows of block_size inputs (each with its next-token targets) that fit the split."""
    usable = n_tokens - 1
    if max_tokens is not None:
        usable = min(usable, max_tokens)
    if usable < block_size:
        if max_tokens is not None and max_tokens < block_size:
            raise UserError(f"eval.max_tokens: {max_tokens} is less than one window of model.block_size={block_size}")
        raise UserError(f"validation split of {n_tokens} tokens is shorter than one window of {block_size + 1} "
                        "(model.block_size + 1): use a larger corpus, a larger data.val_fraction or a smaller "
                        "model.block_size")
    return usable // block_size


@torch.no_grad()
def score_split(model, tokenizer, tokens: np.ndarray, *, block_size: int, batch_size: int,
                max_tokens: int | None = None) -> SplitScore:
    """Sum the next-token loss over consecutive windows of the split, batch_size windows at a time."""
    n_windows = window_count(len(tokens), block_size, max_tokens)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll = 0.0
    try:
        for start in range(0, n_windows, batch_size):
            stop = min(start + batch_size, n_windows)
            chunk = np.asarray(tokens[start * block_size: stop * block_size + 1], dtype=np.int64)
            x = torch.from_numpy(chunk[:-1].reshape(stop - start, block_size)).to(device)  # (B, T)
            y = torch.from_numpy(chunk[1:].reshape(stop - start, block_size)).to(device)   # (B, T)
            logits, _ = model(x)                                                            # (B, T, V)
            nll += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                         reduction="sum"))
    finally:
        model.train(was_training)
    # The targets of consecutive windows are one contiguous stretch: decoding it whole counts its
    # bytes exactly, even where a byte-level token splits a character at a window boundary.
    targets = np.asarray(tokens[1: n_windows * block_size + 1]).tolist()
    n_bytes = len(tokenizer.decode(targets).encode("utf-8"))
    return SplitScore(nll=nll, tokens=n_windows * block_size, bytes=n_bytes, windows=n_windows,
                      block_size=block_size)


def check_finite(score: SplitScore) -> None:
    """Refuse a score that is not finite: such a model must never be logged, registered or promoted."""
    if not (math.isfinite(score.val_loss) and math.isfinite(score.bits_per_byte)):
        raise UserError(f"evaluation: validation loss {score.val_loss:.4g} and bits per byte "
                        f"{score.bits_per_byte:.4g} over {score.windows} windows are not finite: the model's "
                        "weights diverged; retrain with a lower train.lr (or train.grad_clip on)")


def nanogpt_num_params(model) -> int:
    """The model's parameters as nanoGPT's get_num_params counts them: all but the position embeddings
    (a tied embedding counted once)."""
    wpe = getattr(model, "wpe", None)
    return model.num_params(non_embedding=False) - (wpe.weight.numel() if wpe is not None else 0)


def prompts_from_split(tokens, tokenizer, n: int = 3, chars: int = PROMPT_CHARS) -> list[str]:
    """n prompts from the validation split: the start of the first line at or after 0%, 33%, 66% of it,
    at most `chars` characters, cut after a word. Decoded from the split, so a char model knows them."""
    prompts = []
    for i in range(n):
        start = len(tokens) * i // n
        text = tokenizer.decode(np.asarray(tokens[start: start + 64 * chars]).tolist())
        cut = text.find("\n")
        line = text[cut + 1:] if 0 <= cut < len(text) - 1 else text
        line = line.split("\n", 1)[0] or line[:chars]
        if len(line) > chars:
            line = line[:chars].rsplit(" ", 1)[0] + " " if " " in line[:chars] else line[:chars]
        if line.strip() and line not in prompts:
            prompts.append(line)
    return prompts or [tokenizer.decode(np.asarray(tokens[:8]).tolist())]


def evaluate_pack(model, tokenizer, data: PreparedData, cfg: PipelineConfig) -> EvalResult:
    """Score the whole validation split (or its first eval.max_tokens) and sample every prompt."""
    from flows.modelpack import generate_text

    score = score_split(model, tokenizer, data.tokens("val"), block_size=model.config.block_size,
                        batch_size=cfg.eval.batch_size, max_tokens=cfg.eval.max_tokens)
    check_finite(score)
    prompts = cfg.eval.prompts if cfg.eval.prompts is not None else prompts_from_split(data.tokens("val"), tokenizer)
    texts = generate_text(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                          temperature=cfg.eval.temperature, top_k=cfg.eval.top_k, seed=cfg.eval.seed)
    return EvalResult(val_loss=score.val_loss, perplexity=math.exp(min(score.val_loss, 50.0)),
                      bits_per_byte=score.bits_per_byte, tokens=score.tokens, bytes=score.bytes,
                      windows=score.windows, block_size=score.block_size, num_params=nanogpt_num_params(model),
                      samples=[{"prompt": p, "completion": t} for p, t in zip(prompts, texts)])


def attention_example(model, tokenizer, text: str, max_tokens: int = ATTENTION_TOKENS):
    """(maps (n_layer, n_head, T, T) as numpy, the T token strings) for the start of text."""
    ids = tokenizer.encode(text)[: min(max_tokens, model.config.block_size)] or [tokenizer.eot_id]
    device = next(model.parameters()).device
    maps = model.attention_maps(torch.tensor(ids, dtype=torch.long, device=device))
    return maps.cpu().numpy(), [tokenizer.decode([i]) for i in ids]


def eval_device(cfg: PipelineConfig) -> str:
    """Where evaluation runs: the GPU when training used GPUs and this process sees one, else the CPU."""
    return "cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"


def evaluate_checkpoint(checkpoint_path: str, data: PreparedData, cfg: PipelineConfig,
                        clock: StageClock | None = None, run_name: str = ""):
    """(EvalResult, attention heatmap figure) for a Ray Train checkpoint of this dataset; `clock`
    gets the stages `final_eval` and `figures`; the figure's title names `run_name`."""
    from flows.figures import attention_heatmaps_figure
    from flows.modelpack import export_model_pack, load_model_pack

    clock = clock or StageClock()
    with clock.stage("final_eval"):
        with tempfile.TemporaryDirectory() as tmp:
            model, tokenizer = load_model_pack(export_model_pack(checkpoint_path, data.path, Path(tmp) / "pack"),
                                               device=eval_device(cfg))
        result = evaluate_pack(model, tokenizer, data, cfg)
    with clock.stage("figures"):
        if result.samples:
            text = result.samples[0]["prompt"] + result.samples[0]["completion"]
        else:
            text = tokenizer.decode(np.asarray(data.tokens("val")[:ATTENTION_TOKENS]).tolist())
        maps, labels = attention_example(model, tokenizer, text)
        title = f"{run_name}: attention on the first prompt and its sample" if run_name else \
            "attention on the first prompt and its sample"
        figure = attention_heatmaps_figure(maps, labels, title=title)
    return result, figure
