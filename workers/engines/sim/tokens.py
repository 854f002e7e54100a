"""Deterministic pseudo-random output of the simulated engine: which token comes at which position.

The ``n``-th generated token of a request (``n = 0`` is the prefill's token) is a pure function of
the engine seed, the prompt, ``n`` and, for sampled requests (``temperature > 0``), the request's
seed: a 64-bit key, BLAKE2b over those values once per request, and SplitMix64's output at
position ``n`` of the sequence that key seeds (a counter-based draw, so any position is computed
alone, one at a time or a whole run at once with numpy). A greedy request ignores its seed, as a
real greedy sampler does.
Because nothing depends on batching, timing or which worker computed what, a request prefilled on
one worker and decoded on another yields exactly the tokens a single worker generates, and so does
a resumed request (its prompt followed by the ``generated`` tokens it had produced: the stream is
keyed by the original prompt and continues at index ``generated``).

Ids are printable ASCII bytes (32..126) of the byte tokenizer, so responses are readable text,
or the byte tokenizer's EOS (257). Each position is EOS with probability ``1 / mean_output_tokens``
(a geometric output length with that mean); the finish rules are the reference engine's: EOS ends
the request unless ``ignore_eos``, a ``stop_token_ids`` hit ends it, ``max_tokens`` (counting token
0) ends it, and so does reaching ``max_model_len``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, SamplingParams

VOCAB_SIZE = 260  # the byte tokenizer: 0..255 bytes, 256 BOS, 257 EOS, 258..259 spare
EOS_TOKEN_ID = 257
_PRINTABLE_FIRST = 32
_PRINTABLE_COUNT = 95  # 32..126
_U32 = float(1 << 32)
_MASK64 = (1 << 64) - 1
# SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014).
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# A run this short is drawn token by token: a dozen numpy calls on a few values cost more than the
# plain ints, several times more under load, when numpy's code is no longer in the CPU's caches.
_PLAIN_RUN = 32


def check_sampling(sampling: SamplingParams) -> None:
    """Raise INVALID_REQUEST for parameters no sampler could honour (the reference engine's rules),
    and for what a model with no logits cannot do (logprobs, penalties, logit bias)."""
    unmodeled = [
        name
        for name, asked in (
            ("logprobs", sampling.logprobs >= 0 or sampling.prompt_logprobs >= 0),
            ("penalties", sampling.penalized),
            ("logit_bias", bool(sampling.logit_bias)),
            ("top_k", sampling.top_k > 0),
            ("min_p", sampling.min_p > 0),
        )
        if asked
    ]
    if unmodeled:
        raise PdorchError(
            ErrorCode.INVALID_REQUEST,
            f"the simulated engine has no logits: {', '.join(unmodeled)} cannot be honoured",
        )
    if sampling.max_tokens < 1:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"max_tokens must be >= 1, got {sampling.max_tokens}")
    if not np.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"temperature must be >= 0, got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"top_p must be in (0, 1], got {sampling.top_p}")


def check_prompt(
    prompt_token_ids: Sequence[int] | np.ndarray, max_model_len: int, generated: int = 0
) -> np.ndarray:
    """A prompt must be non-empty, in the vocabulary, and leave room for one generated token;
    a resumed request's ``generated`` tokens (the prompt's tail) must leave a prompt before them.
    Returns its ids as one int64 array: converted once here, every later pass over a long prompt
    (the token stream's key, the stand-in KV, the prefix hashes) reads it at numpy speed."""
    if len(prompt_token_ids) == 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, "prompt must be a non-empty list of token ids")
    if not 0 <= generated < len(prompt_token_ids):
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"bad resume point {generated}")
    if len(prompt_token_ids) >= max_model_len:
        raise PdorchError(
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt has {len(prompt_token_ids)} tokens, the model allows {max_model_len - 1} "
            f"(max_model_len {max_model_len})",
        )
    try:
        ids = np.asarray(prompt_token_ids, dtype=np.int64)
    except (OverflowError, TypeError, ValueError):
        ids = None  # past int64: out of the vocabulary too
    if ids is None or ids.ndim != 1 or ids.min() < 0 or ids.max() >= VOCAB_SIZE:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"token ids must be in [0, {VOCAB_SIZE})")
    return ids


class SimTokenStream:
    """The tokens one request generates (see the module docstring for the rule)."""

    __slots__ = ("_eos_threshold", "_key", "_max_model_len", "generated", "prompt_len", "sampling")

    def __init__(
        self,
        engine_seed: int,
        prompt_token_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        mean_output_tokens: float,
        max_model_len: int,
        generated: int = 0,
    ) -> None:
        key = hashlib.blake2b(digest_size=16)
        original = prompt_token_ids[: len(prompt_token_ids) - generated]
        key.update(np.asarray(original, dtype="<i8").tobytes())
        request_seed = sampling.seed if sampling.temperature > 0 else 0
        key.update(f"|{engine_seed}|{request_seed}|{sampling.temperature > 0}".encode())
        self._key = int.from_bytes(key.digest()[:8], "little")
        self._eos_threshold = _U32 / mean_output_tokens
        self._max_model_len = max_model_len
        self.prompt_len = len(prompt_token_ids)  # a resumed request's earlier output included
        self.generated = generated
        self.sampling = sampling

    def token(self, index: int) -> int:
        """Token ``index`` generated here (0 = this job's first: output index ``generated``)."""
        output_index = self.generated + index
        z = (self._key + (output_index + 1) * _GOLDEN) & _MASK64
        z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
        value = z ^ (z >> 31)
        # EOS, drawn at its rate, but not before min_tokens (nor stop_token_ids, all printable ids
        # that the draw below may give: those are skipped to the next printable one).
        if (value & 0xFFFFFFFF) < self._eos_threshold and output_index >= self.sampling.min_tokens:
            return EOS_TOKEN_ID
        token = _PRINTABLE_FIRST + (value >> 32) % _PRINTABLE_COUNT
        if output_index < self.sampling.min_tokens and token in self.sampling.stop_token_ids:
            token = _PRINTABLE_FIRST + (token - _PRINTABLE_FIRST + 1) % _PRINTABLE_COUNT
        return token

    def tokens(self, start: int, count: int) -> np.ndarray:
        """Tokens ``start`` .. ``start + count - 1`` generated here, as :meth:`token` gives them (the
        same draw in numpy: a stepping engine asks for one token at a time, where plain ints are
        several times cheaper than numpy's per-call overhead)."""
        output_index = np.arange(self.generated + start, self.generated + start + count, dtype=np.uint64)
        z = np.uint64(self._key) + (output_index + np.uint64(1)) * np.uint64(_GOLDEN)  # wraps mod 2**64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        value = z ^ (z >> np.uint64(31))
        tokens = (_PRINTABLE_FIRST + (value >> np.uint64(32)) % np.uint64(_PRINTABLE_COUNT)).astype(np.int64)
        early = output_index < np.uint64(self.sampling.min_tokens)
        if self.sampling.stop_token_ids and early.any():
            bump = early & np.isin(tokens, self.sampling.stop_token_ids)
            tokens[bump] = _PRINTABLE_FIRST + (tokens[bump] - _PRINTABLE_FIRST + 1) % _PRINTABLE_COUNT
        eos = (value & np.uint64(0xFFFFFFFF)).astype(np.float64) < self._eos_threshold
        tokens[eos & ~early] = EOS_TOKEN_ID
        return tokens

    def rest(self, done: int) -> tuple[list[int], FinishReason]:
        """Every token after the first ``done`` generated here, up to the one that ends the request
        (by :meth:`finish_reason`'s rules), and why it ends: a whole decode in one pass."""
        s = self.sampling
        # The count at which finish_reason says LENGTH (at least one more token is generated).
        limit = max(done + 1, min(s.max_tokens - self.generated, self._max_model_len - self.prompt_len))
        if limit - done <= _PLAIN_RUN:
            return self._rest_plain(done, limit - done)
        chunks: list[np.ndarray] = []
        start = done
        reason = FinishReason.LENGTH
        while start < limit:
            count = min(limit - start, max(64, start - done))  # chunks that double: EOS may come early
            chunk = self.tokens(start, count)
            stops = np.isin(chunk, s.stop_token_ids) if s.stop_token_ids else np.zeros(count, dtype=bool)
            if not s.ignore_eos:
                stops |= chunk == EOS_TOKEN_ID
            hit = np.flatnonzero(stops)
            if hit.size:
                chunks.append(chunk[: hit[0] + 1])
                reason = FinishReason.STOP
                break
            chunks.append(chunk)
            start += count
        return np.concatenate(chunks).tolist(), reason

    def _rest_plain(self, start: int, count: int) -> tuple[list[int], FinishReason]:
        """:meth:`rest` when at most ``_PLAIN_RUN`` tokens are left, drawn one by one."""
        s = self.sampling
        out = []
        for index in range(start, start + count):
            token = self.token(index)
            out.append(token)
            if token in s.stop_token_ids or (token == EOS_TOKEN_ID and not s.ignore_eos):
                return out, FinishReason.STOP
        return out, FinishReason.LENGTH

    def finish_reason(self, token: int, num_generated: int) -> FinishReason | None:
        """Whether generating ``token`` (the ``num_generated``-th here, from 1) ends the request."""
        s = self.sampling
        if token == EOS_TOKEN_ID and not s.ignore_eos:
            return FinishReason.STOP
        if token in s.stop_token_ids:
            return FinishReason.STOP
        if (
            self.generated + num_generated >= s.max_tokens
            or self.prompt_len + num_generated >= self._max_model_len
        ):
            return FinishReason.LENGTH
        return None
