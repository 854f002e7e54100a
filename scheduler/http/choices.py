"""The ``n`` choices of one request: how each is asked for and how their text comes back.

Choice 0 is placed like any request (prefill, KV handoff, decode). Choices 1..n-1 start once its
prompt's KV is resident on the worker that generates the rest, and run colocated there: that
worker's prefix cache already holds the prompt's blocks, so they share them (never copied, never
handed off again) and compute only the prompt's last, partial block. The prompt is prefilled once.
Each choice is then a request of its own: it migrates on its own if its worker is lost.

Choice ``i`` samples with ``seed + i`` when the client gave a seed (as vLLM does), so each choice
is what a single request with that seed gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field, replace

import msgspec

from scheduler.flow import GenerationRequest, TokenBatch
from scheduler.flow.orchestrator import Orchestrator
from scheduler.placement.types import Placement, PlacementRequest
from scheduler.prediction.output_length import OutputFeatures
from scheduler.stop_strings import TextStream
from scheduler.tokenizer.base import Tokenizer
from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, TokenLogprobs


@dataclass
class Progress:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    error: str = ""
    chars: int = 0  # text sent so far in a stream (completions logprobs' text_offset)
    sent_ids: int = 0  # tokens sent so far in a stream


@dataclass
class Choice:
    index: int
    greq: GenerationRequest
    progress: Progress


def choices(greq: GenerationRequest, n: int, seeded: bool, first: Progress, offset: int = 0) -> list[Choice]:
    """The prompt's ``n`` choices (``first``: choice 0's progress), numbered from ``offset`` (the
    choices of the prompts before it in a batch). The others do not ask for prompt logprobs again
    (choice 0's are theirs) and sample with their own seeds."""
    out = [Choice(offset, greq, first)]
    for i in range(1, n):
        seed = (greq.sampling.seed + i) % 2**64 if seeded else random.getrandbits(63)
        sampling = msgspec.structs.replace(greq.sampling, seed=seed, prompt_logprobs=-1)
        out.append(
            Choice(
                offset + i, replace(greq, request_id=f"{greq.request_id}-{i}", sampling=sampling), Progress()
            )
        )
    return out


async def text_deltas(
    tokenizer: Tokenizer,
    stop: list[str],
    batches: AsyncGenerator[TokenBatch, bool | None],
    progress: Progress,
) -> AsyncIterator[str]:
    """Text deltas, one per batch of tokens (empty while the text is held back: an incomplete UTF-8
    sequence, a possible stop string), until the request finishes or a stop string shows up
    (which ends generation)."""
    text = TextStream(tokenizer.decoder(), stop)
    async for batch in batches:
        progress.token_ids.extend(batch.token_ids)
        progress.logprobs.extend(batch.logprobs)
        progress.prompt_logprobs = progress.prompt_logprobs or batch.prompt_logprobs
        progress.cached_tokens = max(progress.cached_tokens, batch.cached_tokens)
        delta = text.feed(batch.token_ids)
        if text.stopped:
            progress.finish_reason = FinishReason.STOP
            # The request ends here, its job cancelled; told so, the scheduler counts its output
            # so far as its length (a stream that is merely closed may be a client gone).
            with contextlib.suppress(StopAsyncIteration):
                await batches.asend(True)
            yield delta
            return
        if batch.finish_reason is not None:
            progress.finish_reason = str(batch.finish_reason)
            yield delta + text.finish()
            return
        yield delta


# (choice, text delta), or (choice, None) once that choice is complete.
Item = tuple[Choice, str | None]


async def _items(
    choice: Choice,
    batches: AsyncGenerator[TokenBatch, bool | None],
    tokenizer: Tokenizer,
    stop: list[str],
    first_in: asyncio.Event | None = None,
) -> AsyncGenerator[Item, None]:
    """One choice's items (``first_in``: set at its first)."""
    async with contextlib.aclosing(batches):
        deltas = text_deltas(tokenizer, stop, batches, choice.progress)
        async with contextlib.aclosing(deltas):
            async for delta in deltas:
                if first_in is not None:
                    first_in.set()
                yield choice, delta
    if first_in is not None:
        first_in.set()
    yield choice, None


def generate(
    orchestrator: Orchestrator,
    plan: tuple[OutputFeatures, PlacementRequest],
    placement: Placement | None,
    all_choices: list[Choice],
    tokenizer: Tokenizer,
    stop: list[str],
    timeout_s: float,
) -> AsyncGenerator[Item, None]:
    """Every choice's text deltas, interleaved as they come (``placement``: choice 0's, booked at
    admission). A choice's failure ends them all (the client asked for n answers); closing this
    stops every choice's jobs."""
    first = all_choices[0]
    if len(all_choices) == 1:  # no task, no queue on the hot path
        return _items(first, orchestrator.generate(first.greq, plan, placement), tokenizer, stop)

    resident: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    first_in = asyncio.Event()  # choice 0's first batch is in (its prompt logprobs with it)

    def on_resident(worker_id: str) -> None:
        if not resident.done():
            resident.set_result(worker_id)

    async def follower(choice: Choice) -> AsyncGenerator[Item, None]:
        try:
            async with asyncio.timeout(timeout_s):
                worker_id = await resident
                await first_in.wait()
        except TimeoutError:
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"choice 0 did not get going within {timeout_s:g}s"
            ) from None
        choice.progress.prompt_logprobs = first.progress.prompt_logprobs
        items = _items(choice, orchestrator.generate(choice.greq, follow=worker_id), tokenizer, stop)
        async with contextlib.aclosing(items):
            async for item in items:
                yield item

    batches = orchestrator.generate(first.greq, plan, placement, on_resident=on_resident)
    leader = _items(first, batches, tokenizer, stop, first_in)
    return merge([leader, *(follower(c) for c in all_choices[1:])])


async def merge(streams: list[AsyncGenerator[Item, None]]) -> AsyncGenerator[Item, None]:
    """The items of several streams, interleaved as they come, each run by a task of its own. The
    first failure ends them all; closing this closes every stream."""
    items: asyncio.Queue[Item | BaseException | None] = asyncio.Queue()

    async def pump(stream: AsyncGenerator[Item, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    items.put_nowait(item)
            items.put_nowait(None)  # this stream is done
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, which ends the request with it
            items.put_nowait(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            item = await items.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
