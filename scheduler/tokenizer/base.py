"""The tokenizer interface the scheduler uses for every model.

The scheduler tokenizes (so prompt lengths and prefix-block hashes mean the same for every engine)
and detokenizes the token stream into text deltas.
"""

from __future__ import annotations

from typing import Protocol


class ChatMessage(Protocol):
    role: str
    content: str


class IncrementalDecoder(Protocol):
    def feed(self, token_ids: list[int]) -> str:
        """Text for these tokens that is final (an incomplete UTF-8 sequence is held back)."""
        ...

    def flush(self) -> str:
        """Whatever was held back, at the end of the stream."""
        ...


# Texts at least this long are tokenized without the GIL (the single-text call of the Hugging Face
# library holds it, its batch call does not, and costs more on short texts), so a caller may hand
# them to a thread while its event loop serves others.
GIL_FREE_CHARS = 16384


class Tokenizer(Protocol):
    eos_token_id: int
    # No token stands for more characters than this, so a text of n characters has at least
    # n / max_token_chars tokens: a prompt too long to serve is refused before it is tokenized.
    max_token_chars: int

    def encode(self, text: str) -> list[int]:
        """A text of ``GIL_FREE_CHARS`` or more is tokenized without the GIL."""
        ...

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> list[int]:
        """Token ids of a chat (list of (role, content)) ready for the assistant's reply."""
        ...

    def decoder(self) -> IncrementalDecoder: ...

    def decode(self, token_ids: list[int]) -> str: ...
