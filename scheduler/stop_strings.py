"""Turns a token stream into text deltas and stops at the first stop string.

Text that might be the start of a stop string is held back until it is known not to be, so a
stop string never reaches the client. Engine-agnostic: the same code runs for every engine and
for colocated and disaggregated serving, so their outputs stay identical.
"""

from __future__ import annotations

from scheduler.tokenizer.base import IncrementalDecoder


class TextStream:
    def __init__(self, decoder: IncrementalDecoder, stop: list[str]) -> None:
        self._decoder = decoder
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def feed(self, token_ids: list[int]) -> str:
        """Final text for these tokens; sets ``stopped`` when a stop string appeared."""
        return self._scan(self._held + self._decoder.feed(token_ids), final=False)

    def finish(self) -> str:
        """The held-back tail at the end of the stream."""
        if self.stopped:
            return ""
        return self._scan(self._held + self._decoder.flush(), final=True)

    def _scan(self, text: str, final: bool) -> str:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return text[: min(hits)]
        keep = 0 if final else self._partial_suffix(text)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
