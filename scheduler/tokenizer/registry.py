"""Tokenizers by the spec a worker announces in ``Hello.tokenizer``, loaded once and cached."""

from __future__ import annotations

from scheduler.tokenizer.base import Tokenizer
from scheduler.tokenizer.byte_level import ByteTokenizer


class TokenizerRegistry:
    def __init__(self) -> None:
        self._cache: dict[str, Tokenizer] = {}

    def get(self, spec: str) -> Tokenizer:
        tok = self._cache.get(spec)
        if tok is None:
            if spec == "byte":
                tok = ByteTokenizer()
            else:
                # A model directory with tokenizer.json; needs the optional 'tokenizers' package.
                from scheduler.tokenizer.hf import load_tokenizer

                tok = load_tokenizer(spec)
            self._cache[spec] = tok
        return tok
