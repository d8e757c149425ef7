"""A trained model as a self-contained directory: model.safetensors, config.json, tokenizer.json.

This is what the registry logs as MLflow pyfunc artifacts and what `flows generate` loads: weights in
safetensors, everything else JSON, so loading never unpickles anything. `generate_text` is where every
sampling request ends (evaluation, the CLI, the served pyfunc), so it checks each request first: at most
`max_new_tokens_limit` new tokens and prompt tokens (by default the larger of the model's block_size and
MAX_NEW_TOKENS; callers may configure another), a finite temperature >= 0, top_k >= 0 (0: no cut; one
at or above the vocabulary size cuts nothing), a 64-bit seed, and prompts the tokenizer can encode.
Each mistake is a UserError naming the parameter and the value.
"""

from __future__ import annotations

import json
import math
import numbers
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from flows.errors import UserError
from flows.tokenizer import load_tokenizer

if TYPE_CHECKING:  # torch is imported where a model runs: checking sampling arguments needs none
    import torch

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"
# The default cap on new tokens (and on prompt tokens) per prompt, when the model's block_size is
# smaller: generation time grows with it, and so does a RoPE model's KV cache.
MAX_NEW_TOKENS = 1024
SEED_RANGE = (-2**63, 2**63 - 1)  # what torch.Generator.manual_seed takes, and MLflow's "long"


def export_model_pack(checkpoint_dir: str | Path, data_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a training checkpoint's weights and model config plus the dataset's tokenizer into out_dir."""
    checkpoint_dir, out = Path(checkpoint_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((checkpoint_dir / "state.json").read_text())
    shutil.copyfile(checkpoint_dir / WEIGHTS, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(state["model_config"], indent=2))
    shutil.copyfile(Path(data_dir) / TOKENIZER, out / TOKENIZER)
    return out


def load_model_pack(directory: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a directory written by export_model_pack."""
    from attention_core import load_model

    directory = Path(directory)
    return load_model(directory, map_location=device), load_tokenizer(directory / TOKENIZER)


def default_max_new_tokens_limit(block_size: int) -> int:
    """The cap on new tokens, and on prompt tokens, of a model with this block_size."""
    return max(block_size, MAX_NEW_TOKENS)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_limit(limit) -> int:
    """limit itself when it is a positive integer, else a UserError naming max_new_tokens_limit."""
    if not _is_int(limit) or limit < 1:
        raise UserError(f"max_new_tokens_limit: {limit!r} must be a positive integer")
    return limit


def check_sampling(max_new_tokens, temperature, top_k, seed, *, limit: int | None = None) -> None:
    """Raise a UserError naming the first parameter out of range; limit bounds max_new_tokens."""
    if limit is not None:
        check_limit(limit)
    if not _is_int(max_new_tokens) or max_new_tokens < 1 or (limit is not None and max_new_tokens > limit):
        bound = f"from 1 to {limit} (max_new_tokens_limit)" if limit is not None else ">= 1"
        raise UserError(f"max_new_tokens: {max_new_tokens!r} must be an integer {bound}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature: {temperature!r} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise UserError(f"top_k: {top_k!r} must be an integer >= 0 (0: sample from every token)")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise UserError(f"seed: {seed!r} must be an integer from -2**63 to 2**63-1")


def _encode_prompts(tokenizer, prompts: list[str], limit: int) -> list[list[int]]:
    """Token ids of every prompt (an empty one is end-of-text), or a UserError naming the prompt."""
    encoded = []
    for i, prompt in enumerate(prompts):
        name = "prompt" if len(prompts) == 1 else f"prompt {i}"
        if not isinstance(prompt, str):
            raise UserError(f"{name}: {prompt!r} is not a string")
        try:
            ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        except UserError as err:
            raise UserError(f"{name}: {err}") from None
        if len(ids) > limit:
            raise UserError(f"{name}: {len(ids)} tokens, more than the {limit} allowed (max_new_tokens_limit)")
        encoded.append(ids)
    return encoded


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = None, seed: int | None = None,
                  max_new_tokens_limit: int | None = None) -> list[str]:
    """Continue each prompt on its own (exactly what it would get alone); returns only the new text.

    Every parameter and prompt is checked before anything is generated (see the module docstring);
    max_new_tokens_limit None is `default_max_new_tokens_limit(model.config.block_size)`.
    """
    import torch

    limit = max_new_tokens_limit
    if limit is None:
        limit = default_max_new_tokens_limit(model.config.block_size)
    check_sampling(max_new_tokens, temperature, top_k, seed, limit=limit)
    encoded = _encode_prompts(tokenizer, prompts, limit)
    top_k = int(top_k) if top_k else None  # 0 and None: no cut
    device = next(model.parameters()).device
    outputs = []
    for i, ids in enumerate(encoded):
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, int(max_new_tokens), temperature=float(temperature), top_k=top_k,
                             seed=None if seed is None else int(seed) + i)
        outputs.append(tokenizer.decode(out[0, len(ids):].tolist()))
    return outputs
