"""Small HTTP helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

MODEL = "pdorch-reference"


def decode_tie_break(scorer: str) -> str:
    """The ``decode:`` section of a scheduler config's ``placement:``: the usual filters, and
    ``scorer`` to break ties between decode nodes predicted alike (the default draws at random;
    the reference engine's tiny models decode as fast at any batch, so a busy and an idle node tie)."""
    return (
        "  decode:\n"
        "    filters: [{type: role}, {type: health, params: {require_kv_room: true}}]\n"
        f"    scorers: [{{type: {scorer}}}]\n"
    )


async def complete(session: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    body.setdefault("model", MODEL)
    body.setdefault("return_token_ids", True)
    async with session.post(url + "/v1/completions", json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise AssertionError(f"HTTP {r.status}: {data}")
        return data


async def stream_tokens(
    session: aiohttp.ClientSession, url: str, *, seen: list[int] | None = None, **body: Any
) -> tuple[list[int], str, list[dict]]:
    """Streams a completion; returns (token ids, finish reason, all events). Token ids are also
    appended to ``seen`` as they arrive, for a test that acts on a stream's progress."""
    body.setdefault("model", MODEL)
    body.update(stream=True, return_token_ids=True)
    ids: list[int] = seen if seen is not None else []
    finish = ""
    events: list[dict] = []
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[6:])
            events.append(event)
            if "error" in event:
                raise AssertionError(f"stream error: {event['error']}")
            for choice in event.get("choices", []):
                ids.extend(choice.get("token_ids") or [])
                finish = choice.get("finish_reason") or finish
    return ids, finish, events


async def generate(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], seen: list[int] | None = None
) -> tuple[list[int], str]:
    """(token ids, finish reason) of a completion, streamed if ``body["stream"]``."""
    body = dict(body)
    if body.pop("stream", False):
        ids, finish, _ = await stream_tokens(session, url, seen=seen, **body)
        return ids, finish
    choice = (await complete(session, url, **body))["choices"][0]
    return choice["token_ids"], choice["finish_reason"]


async def metric(session: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus sample over every series whose labels include ``labels``."""
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


async def gather_limited(coros: list[Any], limit: int) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def run(c: Any) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))


async def eventually(predicate: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` (run in a thread: it may call the cluster's HTTP API) until it holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await asyncio.to_thread(predicate):
        assert loop.time() < deadline, f"{what} not reached within {timeout_s:g}s"
        await asyncio.sleep(0.02)
