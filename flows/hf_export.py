"""A trained model in the Hugging Face format, loadable by transformers with no custom code.

`export_hf(model, tokenizer, out)` writes config.json, model.safetensors and a `tokenizers`-backed fast
tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) that
`AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)` load as stock
classes, never with `trust_remote_code`. A model maps onto the one stock architecture that computes
exactly what it computes, or is refused:

- learned positions, LayerNorm, GELU, full multi-head attention: GPT-2 (`GPT2LMHeadModel`). GPT-2 always
  has biases; a model without them exports zeros there, which changes nothing.
- RoPE, RMSNorm, SwiGLU (any number of key/value heads): Llama (`LlamaForCausalLM`); with qk-norm, Qwen3
  (`Qwen3ForCausalLM`), whose per-head RMSNorm on queries and keys before the rotation is ours exactly.

Anything else (a mixture of the two, a bidirectional encoder, an option added to ModelConfig that no
mapping here knows) is an `ExportError` naming the option. The tokenizers: char and byte become a BPE
model without merges (one token per character, or per byte through the byte-level alphabet), bpe is
already a `tokenizers` tokenizer; each keeps its ids and has `<|endoftext|>` as its end-of-text token.

Writing needs only safetensors and tokenizers: transformers is an optional extra (`.[hf]`) that reads
the result (the tests check its logits and greedy tokens against attention_core's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from attention_core import ModelConfig
from flows.errors import UserError
from flows.tokenizer import EOT

# ModelConfig fields each mapping accounts for; any other field must keep its default value
# (a new option of attention_core is refused until a mapping here says what it becomes).
_MAPPED = {"vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "pos", "rope_theta", "norm",
           "mlp", "mlp_hidden", "qk_norm", "bias", "tie_embeddings", "causal",
           "dropout", "attn_impl", "zero_init_proj"}  # these do not change what a trained model computes
NORM_EPS = 1e-5  # attention_core's LayerNorm and RMSNorm


class ExportError(UserError):
    """The model has an option with no exact equivalent in a stock transformers architecture."""


def family(cfg: ModelConfig) -> str:
    """'gpt2', 'llama' or 'qwen3': the stock architecture that computes what cfg's model computes."""
    defaults = type(cfg)()
    for field in dataclasses.fields(cfg):
        if field.name not in _MAPPED and getattr(cfg, field.name) != getattr(defaults, field.name):
            raise ExportError(f"model.{field.name}={getattr(cfg, field.name)!r} has no equivalent in a stock "
                              "transformers architecture: this model cannot be exported to the Hugging Face format")
    if not cfg.causal:
        raise ExportError("model.causal=false: a bidirectional encoder is not a causal language model")
    if cfg.pos == "learned":  # GPT-2's shape, nothing else
        wants = {"norm": "layernorm", "mlp": "gelu", "qk_norm": False, "n_kv_head": None}
        name = "gpt2"
    else:
        wants = {"norm": "rmsnorm", "mlp": "swiglu"}
        name = "qwen3" if cfg.qk_norm else "llama"
    for key, value in wants.items():
        if key == "n_kv_head" and cfg.kv_heads == cfg.n_head:
            continue
        if getattr(cfg, key) != value:
            twin = "GPT-2 (learned positions)" if name == "gpt2" else "Llama (rope)"
            raise ExportError(f"model.{key}={getattr(cfg, key)!r} has no exact equivalent in {twin}, which "
                              f"needs {key}={value!r}: this model cannot be exported to the Hugging Face format")
    return name


# ----------------------------------------------------------------------------------------------- configs
def _gpt2_config(cfg: ModelConfig) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.hidden_dim, "activation_function": "gelu", "layer_norm_epsilon": NORM_EPS,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32"}


def _llama_config(cfg: ModelConfig, name: str) -> dict:
    out = {"architectures": ["Qwen3ForCausalLM" if name == "qwen3" else "LlamaForCausalLM"], "model_type": name,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim,
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
           "max_position_embeddings": cfg.block_size, "rms_norm_eps": NORM_EPS, "rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_bias": cfg.bias, "attention_dropout": 0.0, "tie_word_embeddings": cfg.tie_embeddings,
           "torch_dtype": "float32"}
    if name == "llama":
        out["mlp_bias"] = cfg.bias
    elif cfg.bias:  # Qwen3's MLP has no biases
        raise ExportError("model.bias=true with qk_norm: Qwen3's MLP has no biases, so no stock architecture matches")
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    return out


# ----------------------------------------------------------------------------------------------- weights
def _gpt2_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names and nn.Linear (out, in) weights -> GPT-2's names and Conv1D (in, out) weights."""
    def bias_of(prefix: str, size: int) -> torch.Tensor:
        return sd.get(f"{prefix}.bias", torch.zeros(size))

    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"h.{i}", f"transformer.h.{i}"
        for ln in ("ln_1", "ln_2"):
            out[f"{q}.{ln}.weight"] = sd[f"{p}.{ln}.weight"]
            out[f"{q}.{ln}.bias"] = bias_of(f"{p}.{ln}", cfg.n_embd)
        for ours, theirs in (("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"),
                             ("mlp.c_fc", "mlp.c_fc"), ("mlp.c_proj", "mlp.c_proj")):
            w = sd[f"{p}.{ours}.weight"]
            out[f"{q}.{theirs}.weight"] = w.t()
            out[f"{q}.{theirs}.bias"] = bias_of(f"{p}.{ours}", w.size(0))
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = bias_of("ln_f", cfg.n_embd)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _llama_weights(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our fused qkv and gate|up matrices split into Llama's (and Qwen3's) separate projections."""
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(cfg.n_layer):
        p, q = f"h.{i}", f"model.layers.{i}"
        out[f"{q}.input_layernorm.weight"] = sd[f"{p}.ln_1.weight"]
        out[f"{q}.post_attention_layernorm.weight"] = sd[f"{p}.ln_2.weight"]
        for kind in ("weight", "bias") if cfg.bias else ("weight",):
            qkv = sd[f"{p}.attn.c_attn.{kind}"].split([q_dim, kv_dim, kv_dim], dim=0)
            for name, part in zip(("q_proj", "k_proj", "v_proj"), qkv):
                out[f"{q}.self_attn.{name}.{kind}"] = part
            out[f"{q}.self_attn.o_proj.{kind}"] = sd[f"{p}.attn.c_proj.{kind}"]
            gate, up = sd[f"{p}.mlp.c_fc.{kind}"].chunk(2, dim=0)  # the order MLP.forward splits them in
            out[f"{q}.mlp.gate_proj.{kind}"], out[f"{q}.mlp.up_proj.{kind}"] = gate, up
            out[f"{q}.mlp.down_proj.{kind}"] = sd[f"{p}.mlp.c_proj.{kind}"]
        if cfg.qk_norm:
            out[f"{q}.self_attn.q_norm.weight"] = sd[f"{p}.attn.q_norm.weight"]
            out[f"{q}.self_attn.k_norm.weight"] = sd[f"{p}.attn.k_norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ----------------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of `tokenizers`' ByteLevel pre-tokenizer."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer(tokenizer):
    """Our tokenizer as a `tokenizers.Tokenizer` with the same ids and `<|endoftext|>` as a special token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if tokenizer.kind == "bpe":
        tok = Tokenizer.from_str(tokenizer._tok.to_str())
    elif tokenizer.kind == "char":  # no merges, no pre-tokenizer: every character is its own token
        tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(tokenizer.chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
    elif tokenizer.kind == "byte":  # every UTF-8 byte, spelled in the byte-level alphabet, is its own token
        table = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise ExportError(f"data.tokenizer={tokenizer.kind!r}: no Hugging Face tokenizer for this kind")
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    if tok.token_to_id(EOT) != tokenizer.eot_id or tok.get_vocab_size() != tokenizer.vocab_size:
        raise RuntimeError(f"exported {tokenizer.kind} tokenizer disagrees with the original on its ids")
    return tok


def _tokenizer_files(tokenizer, out: Path, block_size: int, positions: str) -> None:
    hf_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    special = {"eos_token": EOT, "bos_token": EOT, "unk_token": EOT}
    # A rope model has no hard context limit; a learned-position model cannot see past block_size.
    max_length = block_size if positions == "learned" else int(1e30)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, "clean_up_tokenization_spaces": False,
         "add_prefix_space": False, **special}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


# ----------------------------------------------------------------------------------------------- export
def export_hf(model, tokenizer, out_dir: str | Path) -> Path:
    """Write model (an attention_core Transformer) and its tokenizer to out_dir in the Hugging Face format.

    The directory appears whole or not at all: everything is written next to it and renamed into place
    (an existing out_dir is replaced). Raises ExportError, naming the option, for a model with no exact
    stock equivalent."""
    from safetensors.torch import save_file

    from attention_core import unwrap_model

    model = unwrap_model(model)
    cfg = model.config
    name = family(cfg)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    weights = _gpt2_weights(sd, cfg) if name == "gpt2" else _llama_weights(sd, cfg)
    config = _gpt2_config(cfg) if name == "gpt2" else _llama_config(cfg, name)
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config.update(eos_token_id=tokenizer.eot_id, bos_token_id=tokenizer.eot_id)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": tokenizer.eot_id, "bos_token_id": tokenizer.eot_id, "pad_token_id": tokenizer.eot_id}))
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        _tokenizer_files(tokenizer, tmp, cfg.block_size, cfg.pos)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_against_transformers(out_dir: str | Path, model, tokenizer, text: str, *,
                               new_tokens: int = 16) -> dict[str, float | bool | str]:
    """Load out_dir with transformers (stock classes only) and compare it with model on text.

    Returns {'architecture', 'max_abs_logit_diff', 'logit_scale' (the logits' standard deviation, so the
    difference can be read against it), 'tokens_equal' (the exported tokenizer's ids are ours),
    'roundtrip' (it decodes what it encodes), 'greedy_equal' (the same new tokens, greedily)}.
    Needs the `hf` extra."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise UserError("checking an export needs transformers: pip install -e '.[hf]'") from None
    from attention_core import unwrap_model

    model = unwrap_model(model).eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(out_dir), trust_remote_code=False, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False)
    ids = tokenizer.encode(text)[: model.config.block_size]
    hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"][: model.config.block_size]
    x = torch.tensor([ids])
    with torch.no_grad():
        ours_logits, _ = model(x)
        their_logits = theirs(x).logits
        prompt = x[:, : max(1, min(len(ids), model.config.block_size - new_tokens) // 2)]
        ours_new = model.generate(prompt, new_tokens, temperature=0.0)[0, prompt.size(1):].tolist()
        their_new = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                    do_sample=False)[0, prompt.size(1):].tolist()

    def until_eot(tokens: list[int]) -> list[int]:  # transformers stops at end-of-text, ours goes on
        return tokens[: tokens.index(tokenizer.eot_id) + 1] if tokenizer.eot_id in tokens else tokens

    return {"architecture": type(theirs).__name__,
            "max_abs_logit_diff": float((ours_logits - their_logits).abs().max()),
            "logit_scale": float(ours_logits.std()),
            "tokens_equal": hf_ids == ids,
            "roundtrip": hf_tok.decode(hf_tok(text, add_special_tokens=False)["input_ids"]) == text,
            "greedy_equal": until_eot(ours_new) == until_eot(their_new)}


HF_DIR = "hf"  # the folder of a logged model (and so of its model versions) that holds the export


def export_pack_hf(pack_dir: str | Path, out_dir: str | Path) -> dict[str, str]:
    """Export a model pack (flows/modelpack.py) to out_dir; returns tags saying what was written, or why
    nothing was (a model with no stock equivalent is still registered, without the `hf/` folder)."""
    from flows.modelpack import load_model_pack

    model, tokenizer = load_model_pack(pack_dir)
    try:
        out = export_hf(model, tokenizer, out_dir)
    except ExportError as err:
        return {"hf.export": f"none: {err}"[:5000]}
    architecture = json.loads((out / "config.json").read_text())["architectures"][0]
    return {"hf.export": f"{HF_DIR}/", "hf.architecture": architecture}
