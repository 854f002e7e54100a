"""The reference engine's tokenizer: one token per UTF-8 byte, plus BOS and EOS.

Ids 0..255 are bytes, 256 is BOS, 257 is EOS; higher ids are special and never printed.
"""

from __future__ import annotations

import codecs

BOS = 256
EOS = 257


class ByteDecoder:
    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: list[int]) -> str:
        return self._utf8.decode(bytes(t for t in token_ids if 0 <= t < 256))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class ByteTokenizer:
    eos_token_id = EOS
    max_token_chars = 1  # a token per UTF-8 byte: at least one per character

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode("utf-8")]

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> list[int]:
        rendered = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
        return self.encode(rendered + "<|assistant|>\n")

    def decoder(self) -> ByteDecoder:
        return ByteDecoder()

    def decode(self, token_ids: list[int]) -> str:
        d = ByteDecoder()
        return d.feed(token_ids) + d.flush()
