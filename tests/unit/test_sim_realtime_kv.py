"""The simulated engine's KV stand-in and link model (no sockets; the integration tests move it)."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.sim.kv_handoff import KvLink, StandInSink, standin_layer, standin_rows

PROMPT = list(range(40))


def test_stand_in_rows_are_the_prompt_blocks_padded() -> None:
    rows = standin_rows(PROMPT, 16)
    assert rows.shape == (3, 16)
    assert rows.flatten()[:40].tolist() == PROMPT
    assert (rows.flatten()[40:] == -1).all()
    assert not np.array_equal(standin_layer(rows, 0), standin_layer(rows, 1))


def test_the_sink_accepts_exactly_this_prompts_rows() -> None:
    sink = StandInSink(PROMPT, 16, num_layers=2)
    base = standin_rows(PROMPT, 16)
    for layer in range(2):
        layer_rows = standin_layer(base, layer)
        sink.write(layer, 0, layer_rows[:2])
        sink.write(layer, 2, layer_rows[2:])
    assert sink.rows_written == 6


@pytest.mark.parametrize(
    ("layer", "offset", "rows"),
    [
        (1, 0, standin_layer(standin_rows(PROMPT, 16), 0)),  # layer 0's rows sent as layer 1
        (0, 0, standin_rows([*PROMPT[:-1], 99], 16)),  # another prompt
        (0, 1, standin_rows(PROMPT, 16)[:1]),  # the wrong block
        (2, 0, standin_rows(PROMPT, 16)),  # no such layer
        (0, 2, standin_rows(PROMPT, 16)),  # past the end
    ],
)
def test_the_sink_refuses_anything_else(layer: int, offset: int, rows: np.ndarray) -> None:
    sink = StandInSink(PROMPT, 16, num_layers=2)
    with pytest.raises(PdorchError) as e:
        sink.write(layer, offset, rows)
    assert e.value.code is ErrorCode.KV_CORRUPT


def test_the_link_serves_transfers_in_turn_at_its_bandwidth() -> None:
    link = KvLink(gbytes_per_s=10.0, time_scale=0.5)
    assert link.book(100.0, 10**9) == pytest.approx((100.0, 0.05))
    # A second transfer starting meanwhile waits for the first.
    assert link.book(100.01, 2 * 10**9) == pytest.approx((100.05, 0.1))
    # An idle link starts at once.
    assert link.book(200.0, 10**9)[0] == 200.0
    assert link.bytes_modeled == 4 * 10**9
    with pytest.raises(PdorchError):
        KvLink(0.0, 1.0)
