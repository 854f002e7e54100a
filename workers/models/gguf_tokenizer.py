"""A GGUF file's tokenizer as Hugging Face tokenizer files: ``tokenizer.json`` (built with the
``tokenizers`` library), ``tokenizer_config.json`` and ``chat_template.jinja``.

Only byte-level BPE vocabularies (``tokenizer.ggml.model = gpt2``) are supported, with the
pre-tokenizers whose llama.cpp split rules are known here. Control and user-defined tokens become
added tokens, matched whole in any text (otherwise chat markup such as ``<|im_start|>`` would be
split into characters).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from transport.errors import ErrorCode, PdorchError
from workers.models.gguf_llama import GgufLlama

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp pre-tokenizer name -> whether digits are split one by one before GPT-2's byte-level
# regex (llama.cpp: "\p{N}" then the GPT-2 pattern). Names not listed are refused.
_SPLITS_DIGITS = MappingProxyType(
    {
        "default": False,
        "gpt2": False,
        "smollm": True,
        "starcoder": True,
        "refact": True,
        "command-r": True,
        "codeshell": True,
    }
)


def build_tokenizer(gguf: GgufLlama) -> Tokenizer:
    model = gguf.field("tokenizer.ggml.model")
    if model != "gpt2":
        raise PdorchError(
            ErrorCode.CONFIG, f"{gguf.path.name}: tokenizer model {model!r}; only byte-level BPE (gpt2)"
        )
    pre = gguf.field("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS_DIGITS:
        raise PdorchError(ErrorCode.CONFIG, f"{gguf.path.name}: unsupported pre-tokenizer {pre!r}")
    tokens: list[str] = gguf.field("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in gguf.field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if _SPLITS_DIGITS[pre]
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    if gguf.field("tokenizer.ggml.add_bos_token", False):
        # Models that expect a BOS in front of every text get it from the post-processor, which
        # encode(add_special_tokens=True) applies, as Hugging Face tokenizers do.
        bos_id = gguf.hyperparams.bos_token_id
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types: list[int] = gguf.field("tokenizer.ggml.token_type", [])
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=kind == _CONTROL, normalized=False)
            for i, kind in enumerate(types)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
    )
    return tok


def tokenizer_config(gguf: GgufLlama) -> dict[str, Any]:
    hp = gguf.hyperparams
    tokens: list[str] = gguf.field("tokenizer.ggml.tokens")

    def token(key: str) -> str | None:
        index = gguf.field(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    config: dict[str, Any] = {
        # The generic class: it loads tokenizer.json exactly as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "add_bos_token": bool(gguf.field("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.context_length,
    }
    return {key: value for key, value in config.items() if value is not None}


def write_tokenizer_files(gguf: GgufLlama, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json and (if the file has one) chat_template.jinja."""
    build_tokenizer(gguf).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(gguf), indent=2) + "\n")
    template = gguf.field("tokenizer.chat_template")
    if template:
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")
