"""The reference engine's inner loop: admission, paged KV, continuous batching. No I/O.

Threading contract: :meth:`EngineCore.step` runs on one thread (the engine thread). Every other
public method is thread-safe and cheap (it only touches a small lock-guarded inbox), so the
agent's event loop can add, reserve and cancel while a step computes. ``cache.scatter`` into
blocks from :meth:`EngineCore.reserve_decode` is safe from any thread until ``add_decode``.

One step = take the inbox, give every running sequence the block its next token needs, admit
waiting prompts within the per-step token budget and run their prefills, then ONE batched decode
step over the running sequences that have their blocks.

Determinism: prompts are prefilled one at a time and every token is sampled from an RNG seeded
by (seed, generated index), so a request yields the same tokens alone or in any batch, and
whether it was prefilled here or on another core whose KV was copied in.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Sequence

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import Load, SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache
from workers.engines.reference.model import LayerKvCallback, ReferenceModel
from workers.engines.reference.sampler import sample, validate_sampling
from workers.engines.reference.sequence import EngineSequence, SequenceKind, finish_reason
from workers.engines.reference.step_output import StepOutput


class _Reservation(msgspec.Struct, frozen=True):
    blocks: list[int]
    num_prompt_tokens: int


class _EngineStats(msgspec.Struct, frozen=True):
    """Counts of engine-thread state, published at the end of every step for :meth:`load`."""

    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0


class EngineCore:
    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        max_batch: int = 64,
        max_prefill_tokens_per_step: int = 2048,
    ) -> None:
        if max_batch <= 0 or max_prefill_tokens_per_step <= 0:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"max_batch and max_prefill_tokens_per_step must be positive, "
                f"got {max_batch} and {max_prefill_tokens_per_step}",
            )
        self.config = cfg
        self.block_size = block_size
        self.max_batch = max_batch
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step
        self.model = ReferenceModel(cfg)
        self.cache = PagedKvCache(cfg, num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks)
        # Shared with other threads, guarded by _lock.
        self._lock = threading.Lock()
        self._inbox: list[EngineSequence] = []
        self._cancelled: list[EngineSequence] = []
        self._live: dict[str, EngineSequence] = {}
        self._reserved: dict[str, _Reservation] = {}
        self._stats = _EngineStats()
        # Engine-thread state.
        self._waiting: deque[EngineSequence] = deque()
        self._pending_decode: deque[EngineSequence] = deque()
        self._running: dict[str, EngineSequence] = {}
        self._admission_order = itertools.count()

    # ------------------------------------------------------------------ requests (any thread)

    def add_prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        sampling: SamplingParams,
        on_layer: LayerKvCallback | None = None,
    ) -> None:
        """Prefill only: KV per layer to ``on_layer``, emit token 0, then free the blocks."""
        prompt = self._check_prompt(prompt_token_ids, sampling)
        seq = EngineSequence(request_id, SequenceKind.PREFILL_ONLY, len(prompt), sampling, prompt, on_layer)
        self._enqueue(seq)

    def add_generate(
        self, request_id: str, prompt_token_ids: Sequence[int], sampling: SamplingParams
    ) -> None:
        """Colocated: prefill, then decode here until the request finishes."""
        prompt = self._check_prompt(prompt_token_ids, sampling)
        self._enqueue(EngineSequence(request_id, SequenceKind.GENERATE, len(prompt), sampling, prompt))

    def reserve_decode(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        """Allocate blocks for a handed-off prompt's KV plus the first fed token.

        The KV plane scatters the prompt's rows into the returned blocks; then :meth:`add_decode`
        starts the sequence (or :meth:`cancel` returns the blocks). Raises OUT_OF_BLOCKS.
        """
        if not 1 <= num_prompt_tokens < self.config.max_model_len:
            raise PdorchError(
                ErrorCode.PROMPT_TOO_LONG if num_prompt_tokens > 0 else ErrorCode.INVALID_REQUEST,
                f"cannot decode after a prompt of {num_prompt_tokens} tokens "
                f"(max_model_len {self.config.max_model_len})",
            )
        with self._lock:
            self._check_new_id(request_id)
            blocks = self.allocator.allocate(self.cache.blocks_for(num_prompt_tokens + 1))
            self._reserved[request_id] = _Reservation(blocks, num_prompt_tokens)
        return blocks

    def add_decode(
        self, request_id: str, prompt_len: int, first_token: int, sampling: SamplingParams
    ) -> None:
        """Start decoding from reserved blocks that hold the KV of positions [0, prompt_len).

        ``first_token`` is generated token 0 (from the prefill worker); it is fed at position
        ``prompt_len`` and the next sampled token has generated index 1. On error the reservation
        stays in place for :meth:`cancel`.
        """
        validate_sampling(sampling)
        if not 0 <= first_token < self.config.vocab_size:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"first token {first_token} outside the vocabulary")
        if finish_reason(self.config, sampling, prompt_len, first_token, 1) is not None:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"request {request_id} already finished at token 0")
        with self._lock:
            reservation = self._reserved.get(request_id)
            if reservation is None:
                raise PdorchError(ErrorCode.INVALID_REQUEST, f"no KV blocks reserved for {request_id}")
            if reservation.num_prompt_tokens != prompt_len:
                raise PdorchError(
                    ErrorCode.INVALID_REQUEST,
                    f"{request_id}: blocks reserved for {reservation.num_prompt_tokens} prompt tokens, "
                    f"add_decode says {prompt_len}",
                )
            del self._reserved[request_id]
            seq = EngineSequence(request_id, SequenceKind.DECODE, prompt_len, sampling)
            seq.blocks = list(reservation.blocks)
            seq.num_generated = 1
            seq.last_token = first_token
            self._live[request_id] = seq
            self._inbox.append(seq)

    def cancel(self, request_id: str) -> None:
        """Forget a request; its blocks are free now (reserved) or by the end of the next step.

        Unknown or finished ids are ignored. No output is emitted for a cancelled request.
        """
        with self._lock:
            reservation = self._reserved.pop(request_id, None)
            if reservation is not None:
                self.allocator.free(reservation.blocks)
                return
            seq = self._live.pop(request_id, None)
            if seq is not None:
                seq.cancelled = True
                self._cancelled.append(seq)

    def has_work(self) -> bool:
        with self._lock:
            stats = self._stats
            return bool(self._inbox or self._cancelled or stats.running or stats.waiting)

    def load(self) -> Load:
        with self._lock:
            stats = self._stats
            queued = [s for s in self._inbox if s.kind is not SequenceKind.DECODE]
            return Load(
                blocks_used=self.allocator.num_used,
                blocks_total=self.allocator.num_total,
                running=stats.running,
                waiting=stats.waiting + len(self._inbox),
                queued_prefill_tokens=stats.queued_prefill_tokens + sum(s.prompt_len for s in queued),
            )

    # ------------------------------------------------------------------ the loop (engine thread)

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._take_inbox()
        while self._pending_decode and len(self._running) < self.max_batch:
            self._start_running(self._pending_decode.popleft())
        ready = self._grow_running(outputs)
        self._run_prefills(outputs)
        if ready:
            self._run_decode(ready, outputs)
        self._publish_stats()
        return outputs

    def _take_inbox(self) -> None:
        with self._lock:
            arrived, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, []
        for seq in arrived:
            (self._pending_decode if seq.kind is SequenceKind.DECODE else self._waiting).append(seq)
        for seq in cancelled:
            for queue in (self._waiting, self._pending_decode):
                if seq in queue:
                    queue.remove(seq)
            if self._running.get(seq.request_id) is seq:
                del self._running[seq.request_id]
            self._release(seq)

    def _grow_running(self, outputs: list[StepOutput]) -> list[EngineSequence]:
        """Give each running sequence the blocks its next token needs; return those that got them.

        A sequence that finds no free block waits. If none can progress at all, the most recently
        admitted one fails with OUT_OF_BLOCKS (freeing its blocks), until one can or none is left.
        """
        ready: list[EngineSequence] = []
        stalled: list[EngineSequence] = []
        for seq in self._running.values():
            (ready if self._grow(seq) else stalled).append(seq)
        while not ready and stalled:
            victim = max(stalled, key=lambda s: s.admitted_at)
            stalled.remove(victim)
            self._fail(
                victim,
                PdorchError(ErrorCode.OUT_OF_BLOCKS, "KV cache full: no running sequence could grow"),
                outputs,
            )
            ready = [seq for seq in stalled if self._grow(seq)]
        return ready

    def _grow(self, seq: EngineSequence) -> bool:
        missing = self.cache.blocks_for(seq.feed_position + 1) - len(seq.blocks)
        if missing <= 0:
            return True
        blocks = self.allocator.try_allocate(missing)
        if blocks is None:
            return False
        seq.blocks.extend(blocks)
        return True

    def _run_prefills(self, outputs: list[StepOutput]) -> None:
        budget = self.max_prefill_tokens_per_step
        admitted = 0
        while self._waiting:
            seq = self._waiting[0]
            if admitted and seq.prompt_len > budget:
                break  # a prompt larger than the whole budget still runs, alone in its step
            generating = seq.kind is SequenceKind.GENERATE
            if generating and len(self._running) >= self.max_batch:
                break
            needed = self.cache.blocks_for(seq.prompt_len)
            if needed > self.allocator.num_total:
                self._waiting.popleft()
                self._fail(
                    seq,
                    PdorchError(
                        ErrorCode.OUT_OF_BLOCKS,
                        f"prompt needs {needed} KV blocks, the cache has {self.allocator.num_total}",
                    ),
                    outputs,
                )
                continue
            # Keep back the blocks running sequences will need next step, so a new prompt does
            # not starve them (a prefill-only prompt returns its blocks within this step).
            headroom = self._blocks_needed_next_step() if generating else 0
            if self.allocator.num_free - needed < headroom:
                break
            blocks = self.allocator.try_allocate(needed)
            if blocks is None:
                break  # another thread reserved blocks meanwhile
            self._waiting.popleft()
            seq.blocks = blocks
            budget -= seq.prompt_len
            admitted += 1
            self._prefill(seq, outputs)

    def _prefill(self, seq: EngineSequence, outputs: list[StepOutput]) -> None:
        assert seq.prompt is not None
        try:
            logits = self.model.prefill(seq.prompt, self.cache, seq.blocks, seq.on_layer)
        except Exception as exc:  # a failing KV callback fails this request, not the engine
            self._fail(seq, _as_pdorch_error(exc), outputs)
            return
        token = sample(logits, seq.sampling, 0)
        seq.num_generated = 1
        seq.last_token = token
        reason = finish_reason(self.config, seq.sampling, seq.prompt_len, token, 1)
        if seq.cancelled:
            self._release(seq)
            return
        outputs.append(StepOutput(seq.request_id, token, reason))
        if reason is not None or seq.kind is SequenceKind.PREFILL_ONLY:
            self._finish(seq)
        else:
            self._start_running(seq)

    def _run_decode(self, ready: list[EngineSequence], outputs: list[StepOutput]) -> None:
        batch = [(seq.last_token, seq.feed_position, seq.blocks) for seq in ready]
        try:
            logits = self.model.decode_step(batch, self.cache)
        except Exception as exc:  # never leave requests hanging on an engine bug
            for seq in ready:
                self._fail(seq, _as_pdorch_error(exc), outputs)
            return
        for seq, row in zip(ready, logits, strict=True):
            if seq.cancelled:
                continue  # released when the cancellation is taken from the inbox
            token = sample(row, seq.sampling, seq.num_generated)
            seq.num_generated += 1
            seq.last_token = token
            reason = finish_reason(self.config, seq.sampling, seq.prompt_len, token, seq.num_generated)
            outputs.append(StepOutput(seq.request_id, token, reason))
            if reason is not None:
                del self._running[seq.request_id]
                self._finish(seq)

    # ------------------------------------------------------------------ bookkeeping

    def _start_running(self, seq: EngineSequence) -> None:
        seq.admitted_at = next(self._admission_order)
        self._running[seq.request_id] = seq

    def _blocks_needed_next_step(self) -> int:
        return sum(
            1 for s in self._running.values() if self.cache.blocks_for(s.feed_position + 2) > len(s.blocks)
        )

    def _fail(self, seq: EngineSequence, error: PdorchError, outputs: list[StepOutput]) -> None:
        if self._running.get(seq.request_id) is seq:
            del self._running[seq.request_id]
        if not seq.cancelled:
            outputs.append(StepOutput.failure(seq.request_id, error))
        self._finish(seq)

    def _finish(self, seq: EngineSequence) -> None:
        self._release(seq)
        with self._lock:
            if self._live.get(seq.request_id) is seq:
                del self._live[seq.request_id]

    def _release(self, seq: EngineSequence) -> None:
        blocks, seq.blocks = seq.blocks, []
        if blocks:
            self.allocator.free(blocks)

    def _publish_stats(self) -> None:
        stats = _EngineStats(
            running=len(self._running),
            waiting=len(self._waiting) + len(self._pending_decode),
            queued_prefill_tokens=sum(s.prompt_len for s in self._waiting),
        )
        with self._lock:
            self._stats = stats

    # ------------------------------------------------------------------ validation

    def _check_prompt(self, prompt_token_ids: Sequence[int], sampling: SamplingParams) -> np.ndarray:
        validate_sampling(sampling)
        prompt = np.asarray(prompt_token_ids, dtype=np.intp)
        if prompt.ndim != 1 or prompt.size == 0:
            raise PdorchError(ErrorCode.INVALID_REQUEST, "prompt must be a non-empty list of token ids")
        if prompt.size > self.config.max_model_len:
            raise PdorchError(
                ErrorCode.PROMPT_TOO_LONG,
                f"prompt has {prompt.size} tokens, the model allows {self.config.max_model_len}",
            )
        if prompt.min() < 0 or prompt.max() >= self.config.vocab_size:
            raise PdorchError(
                ErrorCode.INVALID_REQUEST, f"token ids must be in [0, {self.config.vocab_size})"
            )
        return prompt

    def _enqueue(self, seq: EngineSequence) -> None:
        with self._lock:
            self._check_new_id(seq.request_id)
            self._live[seq.request_id] = seq
            self._inbox.append(seq)

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._live or request_id in self._reserved:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"request id {request_id!r} is already in use")


def _as_pdorch_error(exc: Exception) -> PdorchError:
    if isinstance(exc, PdorchError):
        return exc
    return PdorchError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
