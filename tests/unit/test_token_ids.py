"""A prompt's token ids packed for the jobs, and the range checks made on the way."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.token_ids import TOKEN_ID_DTYPE, pack_token_ids

# Both sides of the size at which a list is checked with Python's min and max instead of numpy's.
SHORT, LONG = list(range(5, 35)), list(range(5, 5005))


@pytest.mark.parametrize(
    "ids", [SHORT, LONG, np.array(LONG, dtype=np.int64), np.array(SHORT, dtype=np.uint16)]
)
def test_ids_are_packed_as_int32(ids: list[int] | np.ndarray) -> None:
    packed = pack_token_ids(ids, vocab_size=6000)
    assert packed.dtype == TOKEN_ID_DTYPE and packed.tolist() == list(ids)


@pytest.mark.parametrize("ids", [SHORT, LONG])
@pytest.mark.parametrize(
    ("bad", "shown"), [(-1, "token id -1"), (2**31, "token id 2147483648"), (1.5e40, "token id 1.5e+40")]
)
def test_ids_outside_int32_are_refused_naming_one(ids: list[int], bad: object, shown: str) -> None:
    with pytest.raises(PdorchError) as e:
        pack_token_ids([*ids[:-1], bad, ids[-1]])
    assert e.value.code is ErrorCode.INVALID_REQUEST and shown in e.value.message


@pytest.mark.parametrize("ids", [SHORT, LONG, np.array(LONG, dtype=TOKEN_ID_DTYPE)])
def test_ids_past_the_vocabulary_are_refused_naming_the_first(ids: list[int] | np.ndarray) -> None:
    vocab = int(ids[len(ids) // 2])
    with pytest.raises(PdorchError) as e:
        pack_token_ids(ids, vocab_size=vocab)
    assert e.value.code is ErrorCode.INVALID_REQUEST
    assert f"token id {vocab} is outside the model's vocabulary (size {vocab})" in e.value.message
    assert pack_token_ids(ids).size == len(ids)  # no vocabulary given: any int32 id


def test_an_empty_prompt_packs_to_an_empty_array() -> None:
    assert pack_token_ids([], vocab_size=10).shape == (0,)
