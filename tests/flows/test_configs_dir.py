"""The configs/ directory: every file loads as a PipelineConfig; the shakespeare CPU recipe keeps nanoGPT's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from attention_core import Transformer
from flows.config import load_config
from flows.evaluate import nanogpt_num_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NANOGPT_CPU_PARAMS = 795_904  # nanoGPT's shakespeare_char CPU model as its get_num_params() counts it
SHAKESPEARE_CHAR_VOCAB = 65 + 1  # tinyshakespeare's 65 characters and the char tokenizer's end-of-text


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    assert load_config(path, ["data.source=corpus.txt"]).data.source == "corpus.txt"


def test_shakespeare_cpu_recipe_has_no_more_parameters_than_nanogpt_and_scores_the_tail_split():
    cfg = load_config(CONFIGS / "shakespeare-char-cpu.yaml")
    model = Transformer(cfg.model.with_vocab(SHAKESPEARE_CHAR_VOCAB))
    assert nanogpt_num_params(model) <= NANOGPT_CPU_PARAMS
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (4, 4, 128, 64)
    assert cfg.data.tokenizer == "char" and cfg.data.val_fraction == 0.1
    assert cfg.eval.max_tokens is None  # eval_val_loss over the whole validation split
