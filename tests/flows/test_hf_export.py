"""The Hugging Face export, checked against transformers itself: stock classes load it (no custom code),
their logits equal attention_core's within 1e-4 on real text, greedy generation gives the same tokens,
and every tokenizer kind gives our ids and decodes what it encodes. Options with no stock equivalent
are refused, naming the option."""

from __future__ import annotations

import json

import pytest
import torch

from attention_core import ModelConfig, Transformer
from flows.errors import UserError
from flows.hf_export import ExportError, check_against_transformers, export_hf, family
from flows.tokenizer import EOT, BPETokenizer, ByteTokenizer, CharTokenizer

pytestmark = pytest.mark.slow  # transformers loads in seconds; make test runs these, test-fast does not
transformers = pytest.importorskip("transformers", reason="the hf extra is part of the dev extras (make test installs it)")

FAMILIES = {  # (options, the class transformers must load it as)
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-bias-untied": ({"bias": True, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama-gqa": ({"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2, "rope_theta": 500.0},
                  "LlamaForCausalLM"),
    "llama-bias-untied": ({"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": True, "tie_embeddings": False},
                          "LlamaForCausalLM"),
    "qwen3-qknorm": ({"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "n_kv_head": 1},
                     "Qwen3ForCausalLM"),
}


@pytest.fixture(scope="module")
def text(shakespeare) -> str:
    return shakespeare.read_text()[:30000]


@pytest.fixture(scope="module")
def tokenizers(text):
    return {"char": CharTokenizer.train([text]), "byte": ByteTokenizer(),
            "bpe": BPETokenizer.train(iter([[text]]), vocab_size=400)}


def scrambled(cfg: ModelConfig) -> Transformer:
    """A model whose weights are far from their initialisation (norm gains included), so its logits
    spread over several units: a wrong mapping of any matrix shows, as it would not on near-zero logits."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("norm.weight") or ".ln_" in name or name.startswith("ln_f")
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if gain and p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_transformers_computes_what_attention_core_computes(name, kind, tokenizers, text, tmp_path):
    options, architecture = FAMILIES[name]
    tok = tokenizers[kind]
    model = scrambled(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32, **options))
    out = export_hf(model, tok, tmp_path / "hf")

    report = check_against_transformers(out, model, tok, text[5000:5400], new_tokens=16)

    assert report["architecture"] == architecture
    assert report["logit_scale"] > 0.5  # logits that differ between tokens, so the comparison means something
    assert report["max_abs_logit_diff"] <= 1e-4, report
    assert report["tokens_equal"] and report["roundtrip"] and report["greedy_equal"], report
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    assert not list(out.parent.glob(".hf.tmp-*"))  # written next to it and renamed into place


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_exported_tokenizer_is_a_stock_fast_tokenizer_with_end_of_text(kind, tokenizers, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = tokenizers[kind]
    export_hf(scrambled(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8)),
              tok, tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(hf, PreTrainedTokenizerFast)
    assert hf.eos_token == EOT and hf.eos_token_id == tok.eot_id and len(hf) == tok.vocab_size
    sample = "ROMEO:\nWhat light through yonder window breaks?\n\n"
    assert hf(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)
    ids = hf(sample, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]
    assert hf.decode(ids, skip_special_tokens=True) == sample


@pytest.mark.parametrize("options, key", [
    ({"norm": "rmsnorm"}, "model.norm"),  # learned positions want GPT-2's LayerNorm
    ({"mlp": "swiglu"}, "model.mlp"),
    ({"n_kv_head": 2}, "model.n_kv_head"),  # GPT-2 has no grouped-query attention
    ({"qk_norm": True}, "model.qk_norm"),
    ({"pos": "rope", "norm": "layernorm", "mlp": "swiglu"}, "model.norm"),
    ({"pos": "rope", "norm": "rmsnorm", "mlp": "gelu"}, "model.mlp"),
    ({"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "qk_norm": True, "bias": True}, "model.bias"),
    ({"causal": False}, "model.causal"),
    ({"mlp": "relu2"}, "model.mlp"),
    ({"logit_softcap": 30.0}, "model.logit_softcap"),  # Gemma 2 caps logits, but is no GPT-2 otherwise
])
def test_an_option_without_a_stock_equivalent_is_refused_by_name(options, key, tmp_path):
    cfg = ModelConfig(vocab_size=20, block_size=16, n_layer=1, n_head=4, n_embd=16, **options)
    with pytest.raises(ExportError, match=rf"^{key}=") as err:
        export_hf(Transformer(cfg), ByteTokenizer(), tmp_path / "hf")
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())


def test_an_option_no_mapping_knows_is_refused_not_dropped():
    """An option added to ModelConfig after this mapping was written is refused at any value but its
    default, until a mapping says what it becomes: the export never silently drops one."""
    import dataclasses

    @dataclasses.dataclass
    class WithNewOption(ModelConfig):
        value_embeddings: int = 0

    assert family(WithNewOption(vocab_size=8)) == "gpt2"
    with pytest.raises(ExportError, match=r"^model\.value_embeddings=2 has no equivalent"):
        family(WithNewOption(vocab_size=8, value_embeddings=2))
