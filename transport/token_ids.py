"""A prompt's token ids as the jobs carry them: one packed int32 array, not a list of Python ints.

A prompt crosses every hop (the scheduler's checks and prefix hashes, the job messages, each
engine's own passes) and is thousands of tokens long. As a list it costs ~20-40 ns per token at
every step that touches it (msgpack's list of ints out, a new int object per token in, a list
converted to an array again on the far side): ~0.2 ms per 4,000-token job on each agent. Packed,
it travels as one aux frame of the codec (sent without a copy, received as a view of the frame),
and every side works on it at numpy speed. Ids are int32: every vocabulary is far smaller.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError

TOKEN_ID_DTYPE = np.dtype("<i4")
_MAX_ID = int(np.iinfo(TOKEN_ID_DTYPE).max)
# Below this many ids a list is range-checked with Python's min and max: numpy's reductions cost
# more on a few values, and several times more under load (their code out of the CPU's caches).
_SMALL = 64


def pack_token_ids(ids: Sequence[int] | np.ndarray, vocab_size: int = 0) -> np.ndarray:
    """``ids`` as a 1-D int32 array (one that already is one is returned as it is, unchecked when
    no ``vocab_size`` is given). Raises ``INVALID_REQUEST`` for ids that are not whole numbers in
    [0, 2**31), or, given ``vocab_size``, not below it."""
    if isinstance(ids, np.ndarray):
        if ids.dtype == TOKEN_ID_DTYPE and ids.ndim == 1 and not vocab_size:
            return ids
        if ids.dtype.kind not in "iu":  # no float or other array is silently truncated to ids
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"token ids must be integers, got {ids.dtype}")
        ids = ids.tolist()
    try:
        arr = np.asarray(ids, dtype=TOKEN_ID_DTYPE)  # a Python int past int32 raises, not wraps
    except (OverflowError, TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1:
        lowest = highest = -1
    elif not arr.size:
        return arr
    elif arr.size < _SMALL:
        lowest, highest = min(ids), max(ids)
    else:
        lowest = int(arr.min())
        highest = int(arr.max()) if vocab_size else 0
    if lowest < 0:
        bad = next((t for t in ids if not (isinstance(t, int | np.integer) and 0 <= t <= _MAX_ID)), None)
        shown = f"token id {bad}" if bad is not None else "token ids"
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"{shown}: ids must be whole numbers in [0, 2**31)")
    if vocab_size and highest >= vocab_size:
        bad = next(t for t in ids if t >= vocab_size)
        raise PdorchError(
            ErrorCode.INVALID_REQUEST, f"token id {bad} is outside the model's vocabulary (size {vocab_size})"
        )
    return arr


def extend_token_ids(prompt: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """``prompt`` followed by ``tokens`` (a resumed request's output so far), packed."""
    return np.concatenate((prompt, pack_token_ids(tokens))) if tokens else prompt


def message_token_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """:func:`pack_token_ids` for a message's field (its ``__post_init__``, which runs when the
    message is made and when it is decoded): ``ValueError``, which the codec reports as a bad
    message, instead of a request error."""
    try:
        return pack_token_ids(ids)
    except PdorchError as e:
        raise ValueError(e.message) from None
