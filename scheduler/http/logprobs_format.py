"""Log-probabilities in the shapes OpenAI clients read (and vLLM writes).

- completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one entry per token;
  ``top_logprobs`` maps token text to log-probability (the sampled token is always among them);
  with ``echo``, the prompt's tokens come first and the very first has ``None`` for both.
- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}]}``.

A token's text is what the tokenizer decodes it to alone (a piece of a UTF-8 sequence shows as
U+FFFD, as in vLLM).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transport.messages import TokenLogprobs

TokenText = Callable[[int], str]


def completion_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprobs | None],
    text: TokenText,
    offset: int = 0,
) -> dict[str, Any]:
    """``logprobs`` aligned with ``token_ids`` (``None`` where there is none: the first prompt
    token); ``offset``: where the first token's text starts in the choice's text."""
    tokens, values, tops, offsets = [], [], [], []
    for token, lp in zip(token_ids, logprobs, strict=True):
        piece = text(token)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(lp.logprob)
        top = {text(t): v for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)}
        top.setdefault(piece, lp.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(
    token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], text: TokenText
) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        piece = text(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}

    content = []
    for token, lp in zip(token_ids, logprobs, strict=True):
        item = entry(token, lp.logprob)
        item["top_logprobs"] = [entry(t, v) for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)]
        content.append(item)
    return {"content": content}
