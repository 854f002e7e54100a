"""A request body's Content-Encoding, undone by the scheduler itself: bounded, in the codings it
reads, with a clear error for the rest."""

from __future__ import annotations

import gzip
import zlib

import pytest

from scheduler.http.request_io import decoded
from transport.errors import ErrorCode, PdorchError

BODY = b'{"model": "m", "prompt": "hello"}'
LIMIT = 1 << 20


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    "encoding, body",
    [
        ("", BODY),
        ("identity", BODY),
        ("gzip", gzip.compress(BODY)),
        ("GZIP", gzip.compress(BODY)),
        (" x-gzip ", gzip.compress(BODY)),
        ("deflate", zlib.compress(BODY)),
        ("deflate", _raw_deflate(BODY)),  # as some clients send "deflate"
    ],
)
def test_the_codings_it_reads(encoding: str, body: bytes) -> None:
    assert decoded(body, encoding, LIMIT) == BODY


def _code(body: bytes, encoding: str, limit: int = LIMIT) -> ErrorCode:
    with pytest.raises(PdorchError) as e:
        decoded(body, encoding, limit)
    return e.value.code


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip"])
def test_other_codings_are_unsupported_media(encoding: str) -> None:
    assert _code(gzip.compress(BODY), encoding) is ErrorCode.UNSUPPORTED_ENCODING


def test_a_body_that_inflates_past_the_limit_is_too_large_and_is_not_inflated_whole() -> None:
    bomb = gzip.compress(b" " * (256 << 20), compresslevel=9)  # 256 MiB in ~250 KiB
    assert len(bomb) < LIMIT
    assert _code(bomb, "gzip") is ErrorCode.REQUEST_TOO_LARGE
    # Exactly at the limit is fine, one byte over is not.
    assert len(decoded(gzip.compress(b"x" * 1000), "gzip", 1000)) == 1000
    assert _code(gzip.compress(b"x" * 1001), "gzip", 1000) is ErrorCode.REQUEST_TOO_LARGE


@pytest.mark.parametrize(
    "body, encoding",
    [
        (BODY, "gzip"),  # not compressed at all
        (gzip.compress(BODY)[:-12], "gzip"),  # cut short
        (b"\x1f\x8b" + b"\x00" * 40, "gzip"),
        (b"", "gzip"),
        (zlib.compress(BODY)[:10], "deflate"),
    ],
)
def test_a_body_that_is_not_what_its_coding_says_is_a_bad_request(body: bytes, encoding: str) -> None:
    assert _code(body, encoding) is ErrorCode.INVALID_REQUEST
