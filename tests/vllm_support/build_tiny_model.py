"""Build a tiny Llama model and a byte-level BPE tokenizer with a chat template in a directory.

Run with the vLLM environment's interpreter (it needs torch and transformers):
``python tests/vllm_support/build_tiny_model.py OUT_DIR``. The weights are random but seeded, and
scaled up from the usual init so greedy decoding has clear winners (no near-ties that batch-order
float noise could flip). The tokenizer is trained on a generated, deterministic corpus.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 1024

_WORD_TEXT = """
the a an of to in for on with from by about prefill decode cache block token tokens model
worker scheduler request latency throughput memory kernel tensor layer attention head query
key value batch queue route broker transfer stream page table hello world how are you today
please write short story poem cat dog river mountain city night morning coffee tea book
number one two three four five six seven eight nine ten café naïve über 東京 こんにちは 🙂
def return import class if else while for print None True False 0 1 2 3 42 3.14 -7 100%
"""
_WORDS = re.findall(r"\S+", _WORD_TEXT)


def corpus(lines: int = 4000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        sep = rng.choice([" ", " ", " ", ", ", ". ", "\n"])
        out.append(sep.join(words) + rng.choice([".", "?", "!", ""]))
    return out


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))


def build_model(out: Path, vocab_size: int, bos: int, eos: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=2,
        initializer_range=0.08,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out), safe_serialization=True)
    model.generation_config.save_pretrained(str(out))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    build_model(out, len(tok), tok.bos_token_id, tok.eos_token_id)
    (out / "BUILT").write_text("ok\n")


if __name__ == "__main__":
    main()
