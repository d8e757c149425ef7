"""The Hugging Face export against transformers: the largest logit difference per family and tokenizer.

For each architecture family (GPT-2, Llama, Qwen3, with their variants) and each tokenizer (char, byte,
bpe), a model with scrambled weights (logits spread over several units) is exported with
`flows.hf_export.export_hf`, loaded by transformers' stock class, and run on 400 characters of
tinyshakespeare; printed: the class, the largest |logit difference| (float32), the logits' scale, and
whether the tokens and 16 greedy tokens agree. tests/flows/test_hf_export.py asserts the same within 1e-4.

    PYTHONPATH=. python bench/hf_equivalence.py   # from the project directory (it imports the test's families)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from attention_core import ModelConfig
from flows.hf_export import check_against_transformers, export_hf
from flows.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer
from tests.flows.test_hf_export import FAMILIES, scrambled  # the families and weights the test checks

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> int:
    text = CORPUS.read_text()[:30000]
    tokenizers = {"char": CharTokenizer.train([text]), "byte": ByteTokenizer(),
                  "bpe": BPETokenizer.train(iter([[text]]), vocab_size=400)}
    print(f"{'family':18s} {'tokenizer':9s} {'class':18s} {'max |dlogit|':>12s} {'logit scale':>11s}  tokens greedy")
    for name, (options, _) in FAMILIES.items():
        for kind, tok in tokenizers.items():
            model = scrambled(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32,
                                          **options))
            with tempfile.TemporaryDirectory() as tmp:
                out = export_hf(model, tok, Path(tmp) / "hf")
                r = check_against_transformers(out, model, tok, text[5000:5400], new_tokens=16)
            print(f"{name:18s} {kind:9s} {r['architecture']:18s} {r['max_abs_logit_diff']:12.2e} "
                  f"{r['logit_scale']:11.2f}  {str(r['tokens_equal']):6s} {r['greedy_equal']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
