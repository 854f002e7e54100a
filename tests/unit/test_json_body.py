"""The scheduler's JSON answers: msgspec's encoding, strict JSON for every float."""

from __future__ import annotations

import json
import math

from scheduler.http.json_body import json_response


def _strict(raw: bytes) -> object:
    def refuse(token: str) -> float:
        raise ValueError(f"not JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


def test_an_answer_is_strict_json_even_with_non_finite_floats() -> None:
    resp = json_response({"logprob": -math.inf, "nan": math.nan, "ok": [1.5, "a", None, True]})
    assert resp.status == 200 and resp.content_type == "application/json"
    assert isinstance(resp.body, bytes)
    assert _strict(resp.body) == {"logprob": None, "nan": None, "ok": [1.5, "a", None, True]}


def test_status_and_headers_pass_through() -> None:
    resp = json_response({"error": {"code": "queue_full"}}, status=429, headers={"Retry-After": "1"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert _strict(resp.body) == {"error": {"code": "queue_full"}}
