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


class Tokenizer(Protocol):
    eos_token_id: int
    # No token stands for more characters than this, so a text of n characters has at least
    # n / max_token_chars tokens: a prompt too long to serve is refused before it is tokenized.
    max_token_chars: int

    def encode(self, text: str) -> list[int]:
        """A long text is tokenized without the GIL, so that a thread can do it while the event
        loop serves others."""
        ...

    def apply_chat_template(self, messages: list[tuple[str, str]]) -> list[int]:
        """Token ids of a chat (list of (role, content)) ready for the assistant's reply."""
        ...

    def decoder(self) -> IncrementalDecoder: ...

    def decode(self, token_ids: list[int]) -> str: ...
