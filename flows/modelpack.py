"""A trained model as a self-contained directory: model.safetensors, config.json, tokenizer.json.

This is what the registry logs as MLflow pyfunc artifacts and what `flows generate` loads: weights in
safetensors, everything else JSON, so loading never unpickles anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from attention_core import load_model
from flows.tokenizer import load_tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


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
    directory = Path(directory)
    return load_model(directory, map_location=device), load_tokenizer(directory / TOKENIZER)


def generate_text(model, tokenizer, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.8,
                  top_k: int | None = None, seed: int | None = None) -> list[str]:
    """Continue each prompt on its own (exactly what it would get alone); returns only the new text."""
    device = next(model.parameters()).device
    outputs = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt) or [tokenizer.eot_id]
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                             seed=None if seed is None else seed + i)
        outputs.append(tokenizer.decode(out[0, len(ids):].tolist()))
    return outputs
