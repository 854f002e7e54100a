"""The reference engine's inner loop: admission, prefix caching, chunked prefill, batching. No I/O.

Threading contract: :meth:`EngineCore.step` runs on one thread (the engine thread). Every other
public method is thread-safe and cheap (it only touches a small lock-guarded inbox and the block
allocator's lock), so the agent's event loop can add, reserve and cancel while a step computes.
``cache.scatter`` into blocks from :meth:`EngineCore.reserve_decode` is safe from any thread until
``add_decode``.

One step = take the inbox, give every running sequence the block its next token needs, spend the
per-step prefill token budget (``max_prefill_tokens_per_step``) on prompt chunks -- first the
prompts already being prefilled, oldest first, then newly admitted ones -- and finally ONE batched
decode step over the running sequences that have their blocks. A prompt longer than what is left
of the budget is prefilled over several steps, so a long prompt delays each running decode by at
most one budget's worth of prefill per step instead of stalling it for the whole prompt.

Prefix caching (``enable_prefix_caching``): an admitted prompt reuses the cached KV blocks that
match its leading full blocks and computes only the rest (see ``prefix_cache``); the number of
prompt tokens served from the cache is reported on the request's first output. Blocks of finished
requests stay cached (evictable, least recently released first) until allocation needs them.

Block accounting (:meth:`EngineCore.load`): ``blocks_used`` counts blocks referenced by a request
(running, prefilling, or reserved for a handoff); ``cached_blocks`` counts unreferenced blocks kept
for their cached prefix -- reusable free space, evicted on demand. ``blocks_used + free +
cached_blocks == blocks_total``.

Determinism: every prompt chunk is computed on its own (never batched with other prompts) and
every token is sampled from an RNG seeded by (seed, generated index), so a request yields the same
tokens alone or in any batch, and whether it was prefilled here or on another core whose KV was
copied in. Chunk boundaries and cache hits change results only at the ~1e-13 level (float64).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import Load, SamplingParams, TokenLogprobs
from workers.engines.reference.block_allocator import BlockAllocator
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.inbox import EngineStats, RequestInbox
from workers.engines.reference.kv_cache import PagedKvCache
from workers.engines.reference.logits_processors import TokenHistory, needs_processing, process_logits
from workers.engines.reference.logprobs import token_logprobs
from workers.engines.reference.lora.adapter import LoraAdapter
from workers.engines.reference.lora.slots import AdapterSlots
from workers.engines.reference.model import LayerKvCallback, ReferenceModel
from workers.engines.reference.prefix_cache import PrefixCache
from workers.engines.reference.request_checks import (
    as_pdorch_error,
    check_decode_start,
    check_handoff_length,
    check_prompt,
)
from workers.engines.reference.sampler import sample
from workers.engines.reference.sequence import EngineSequence, SequenceKind, finish_reason
from workers.engines.reference.step_output import StepOutput
from workers.engines.reference.weights import ModelWeights


class EngineCore:
    """One engine's requests, blocks and model (see the module docstring for the step and the rules).

    ``num_blocks`` blocks of ``block_size`` tokens hold all KV; at most ``max_batch`` sequences
    decode together; each step computes at most ``max_prefill_tokens_per_step`` prompt tokens
    (longer prompts are chunked over steps); ``enable_prefix_caching`` turns KV reuse across
    requests on or off.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        max_batch: int = 64,
        max_prefill_tokens_per_step: int = 512,
        enable_prefix_caching: bool = True,
        weights: ModelWeights | None = None,
        max_loras: int = 4,
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
        self.model = ReferenceModel(cfg, weights)
        self.cache = PagedKvCache(cfg, num_blocks, block_size)
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = PrefixCache(self.allocator, block_size, enable_prefix_caching)
        # LoRA adapters: known by name, at most ``max_loras`` resident (thread-safe).
        self.adapters = AdapterSlots(cfg, max_loras)
        self._inbox = RequestInbox(self.prefix_cache)  # shared with other threads
        # Engine-thread state.
        self._waiting: deque[EngineSequence] = deque()
        self._pending_decode: deque[EngineSequence] = deque()
        self._prefilling: dict[str, EngineSequence] = {}  # admitted, prompt KV not complete yet
        self._running: dict[str, EngineSequence] = {}
        self._admission_order = itertools.count()
        # Tokens the last step computed (prompt chunks + decoded tokens). A step can progress
        # without output (a prompt chunk that is not the last), so callers that back off on
        # empty steps should look at this instead.
        self.last_step_computed_tokens = 0

    # ------------------------------------------------------------------ requests (any thread)

    def add_prefill(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        on_layer: LayerKvCallback | None = None,
        *,
        generated: int = 0,
        adapter: str = "",
    ) -> None:
        """Prefill only: KV per layer to ``on_layer``, emit the first token, then release the blocks.

        ``on_layer(layer, rows)`` is called once per layer, in layer order, during the prompt's
        last chunk, with that layer's KV of ALL prompt positions (rows served from the prefix
        cache or computed by earlier chunks are gathered from the blocks). ``generated``: a resumed
        request, whose last ``generated`` prompt tokens are its own earlier output; the token
        emitted is then its output token ``generated`` (drawn as an uninterrupted run would).
        ``adapter``: the name of a registered LoRA adapter the request runs with ("" = none).
        """
        prompt = check_prompt(self.config, prompt_token_ids, sampling, generated)
        self._submit(request_id, SequenceKind.PREFILL_ONLY, prompt, sampling, on_layer, generated, adapter)

    def add_generate(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int] | np.ndarray,
        sampling: SamplingParams,
        *,
        generated: int = 0,
        adapter: str = "",
    ) -> None:
        """Colocated: prefill, then decode here until the request finishes (``generated`` and
        ``adapter`` as in :meth:`add_prefill`)."""
        prompt = check_prompt(self.config, prompt_token_ids, sampling, generated)
        self._submit(request_id, SequenceKind.GENERATE, prompt, sampling, None, generated, adapter)

    def _submit(
        self,
        request_id: str,
        kind: SequenceKind,
        prompt: np.ndarray,
        sampling: SamplingParams,
        on_layer: LayerKvCallback | None,
        generated: int,
        adapter_name: str,
    ) -> None:
        adapter = self.adapters.acquire(adapter_name) if adapter_name else None
        # Prompt logprobs need every position computed: no prefix served from the cache.
        hashes = [] if sampling.prompt_logprobs >= 0 else self.prefix_cache.hashes(prompt, _salt(adapter))
        seq = EngineSequence(
            request_id, kind, len(prompt), sampling, prompt, on_layer, hashes, generated, adapter
        )
        try:
            self._inbox.submit(seq)
        except BaseException:
            self._release(seq)
            raise

    def reserve_decode(self, request_id: str, num_prompt_tokens: int) -> list[int]:
        """Allocate blocks for a handed-off prompt's KV plus the first fed token.

        The KV plane scatters the prompt's rows into the returned blocks; then :meth:`add_decode`
        starts the sequence (or :meth:`cancel` returns the blocks). Raises OUT_OF_BLOCKS. Cached
        prefix blocks nobody holds are evicted to make room.
        """
        check_handoff_length(self.config, num_prompt_tokens)
        return self._inbox.reserve(
            request_id, self.cache.blocks_for(num_prompt_tokens + 1), num_prompt_tokens
        )

    def add_decode(
        self,
        request_id: str,
        prompt_len: int,
        first_token: int,
        sampling: SamplingParams,
        prompt_token_ids: Sequence[int] | np.ndarray | None = None,
        *,
        generated: int = 0,
        adapter: str = "",
    ) -> None:
        """Start decoding from reserved blocks that hold the KV of positions [0, prompt_len).

        ``first_token`` is the prefill worker's token (output index ``generated``: 0 unless the
        request was resumed, see :meth:`add_prefill`); it is fed at position ``prompt_len`` and the
        next sampled token has output index ``generated + 1``. With
        ``prompt_token_ids`` (the prompt whose KV the blocks hold) and prefix caching on, the
        prompt's full blocks join the prefix cache, so later prompts here can reuse them. On error
        the reservation stays in place for :meth:`cancel`. ``adapter``: the LoRA adapter the
        prefill side computed the KV with (the decode side must run the same one).
        """
        prompt = check_decode_start(
            self.config, request_id, prompt_len, first_token, sampling, prompt_token_ids, generated
        )
        if sampling.penalized and prompt is None:
            raise PdorchError(
                ErrorCode.INVALID_REQUEST, f"{request_id}: penalties need the prompt's token ids"
            )
        lora = self.adapters.acquire(adapter) if adapter else None
        hashes = self.prefix_cache.hashes(prompt, _salt(lora)) if prompt is not None else []
        seq = EngineSequence(
            request_id, SequenceKind.DECODE, prompt_len, sampling, output_offset=generated, adapter=lora
        )
        if sampling.penalized and prompt is not None:
            seq.history = TokenHistory.of_resumed(prompt.tolist(), generated)
            seq.history.add(first_token)
        seq.num_computed = prompt_len
        seq.num_generated = 1
        seq.last_token = first_token
        try:
            self._inbox.start_decode(seq, hashes)
        except BaseException:
            self._release(seq)  # the adapter only: the reservation stays for cancel()
            raise

    def cancel(self, request_id: str) -> None:
        """Forget a request; its blocks are released now (reserved) or by the end of the next step.

        Unknown or finished ids are ignored. No output is emitted for a cancelled request.
        """
        self._inbox.cancel(request_id)

    def has_work(self) -> bool:
        return self._inbox.has_work()

    def load(self) -> Load:
        """Occupancy now (block counts as in the module docstring).

        ``running`` includes prompts being prefilled; ``queued_prefill_tokens`` counts prompt
        tokens not computed yet (for waiting prompts, before any prefix cache hit is known).
        """
        load = self._inbox.load()
        if not self.adapters.slots:
            return load
        return msgspec.structs.replace(
            load, adapter_slots=self.adapters.slots, adapters_resident=self.adapters.resident()
        )

    def cached_block_hashes(self) -> frozenset[int]:
        """The prefix hashes (``prefix_block_hashes`` keys) whose KV this core holds now."""
        return self.allocator.cached_block_hashes()

    def check_block_accounting(self) -> None:
        """Raise INTERNAL unless every block reference belongs to a live request (tests, debugging).

        Call it between steps: it reads engine-thread state.
        """
        self.allocator.check_consistency()
        engine_held = (
            *self._waiting,
            *self._pending_decode,
            *self._prefilling.values(),
            *self._running.values(),
        )
        self._inbox.check_references(engine_held)

    # ------------------------------------------------------------------ the loop (engine thread)

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        self._take_inbox()
        while self._pending_decode and self._batch_slots_taken() < self.max_batch:
            self._start_running(self._pending_decode.popleft())
        ready = self._grow_running(outputs)
        computed = self._run_prefills(outputs)
        if ready:
            self._run_decode(ready, outputs)
            computed += len(ready)
        self.last_step_computed_tokens = computed
        self._publish_stats()
        return outputs

    def _take_inbox(self) -> None:
        arrived, cancelled = self._inbox.take()
        for seq in arrived:
            (self._pending_decode if seq.kind is SequenceKind.DECODE else self._waiting).append(seq)
        for seq in cancelled:
            for queue in (self._waiting, self._pending_decode):
                if seq in queue:
                    queue.remove(seq)
            for table in (self._prefilling, self._running):
                if table.get(seq.request_id) is seq:
                    del table[seq.request_id]
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

    def _run_prefills(self, outputs: list[StepOutput]) -> int:
        """Spend the step's prompt token budget; returns how many prompt tokens were computed."""
        budget = self.max_prefill_tokens_per_step
        for seq in list(self._prefilling.values()):  # prompts already under way, oldest first
            if budget == 0:
                return self.max_prefill_tokens_per_step
            if not seq.cancelled:  # a cancelled one is released when its cancellation is taken
                budget -= self._prefill_chunk(seq, budget, outputs)
        while self._waiting and budget > 0:
            seq = self._waiting[0]
            if seq.kind is SequenceKind.GENERATE and self._batch_slots_taken() >= self.max_batch:
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
            # not starve them. All of a prompt's blocks are taken up front: once admitted, its
            # chunks always complete.
            if not self.prefix_cache.admit(seq, keep_available=self._blocks_needed_next_step()):
                break  # waits for blocks (maybe another thread reserved some meanwhile)
            self._waiting.popleft()
            self._prefilling[seq.request_id] = seq
            budget -= self._prefill_chunk(seq, budget, outputs)
        return self.max_prefill_tokens_per_step - budget

    def _prefill_chunk(self, seq: EngineSequence, budget: int, outputs: list[StepOutput]) -> int:
        """Compute the next chunk of ``seq``'s prompt (at most ``budget`` tokens); returns its size."""
        assert seq.prompt is not None
        start = seq.num_computed
        stop = min(seq.prompt_len, start + budget)
        last = stop == seq.prompt_len
        try:
            # The KV callback runs in the last chunk only, with every prompt row of each layer.
            logits = self.model.prefill(
                seq.prompt[start:stop],
                self.cache,
                seq.blocks,
                seq.on_layer if last else None,
                start,
                all_logits=seq.prompt_logprobs is not None,
                adapter=seq.adapter,
            )
        except Exception as exc:  # a failing KV callback fails this request, not the engine
            self._fail(seq, as_pdorch_error(exc), outputs)
            return stop - start
        if seq.prompt_logprobs is not None:
            # Row i predicts prompt position start + i + 1; the last row predicts the output.
            top = seq.sampling.prompt_logprobs
            for i, token in enumerate(seq.prompt[start + 1 : stop + 1]):
                seq.prompt_logprobs.append(token_logprobs(logits[i], int(token), top))
            logits = logits[-1]
        seq.num_computed = stop
        self.prefix_cache.publish_computed(seq)
        if last:
            del self._prefilling[seq.request_id]
            self._emit_first_token(seq, logits, outputs)
        return stop - start

    def _emit_first_token(self, seq: EngineSequence, logits: np.ndarray, outputs: list[StepOutput]) -> None:
        token, logprobs = self._draw(seq, logits)
        seq.num_generated = 1
        seq.last_token = token
        reason = finish_reason(self.config, seq.sampling, seq.prompt_len, token, 1, seq.output_offset)
        if seq.cancelled:
            self._release(seq)
            return
        outputs.append(
            StepOutput(
                seq.request_id,
                token,
                reason,
                cached_tokens=seq.num_cached,
                logprobs=logprobs,
                prompt_logprobs=seq.prompt_logprobs,
            )
        )
        if reason is not None or seq.kind is SequenceKind.PREFILL_ONLY:
            self._finish(seq)
        else:
            self._start_running(seq)

    def _run_decode(self, ready: list[EngineSequence], outputs: list[StepOutput]) -> None:
        batch = [(seq.last_token, seq.feed_position, seq.blocks) for seq in ready]
        try:
            logits = self.model.decode_step(batch, self.cache, [seq.adapter for seq in ready])
        except Exception as exc:  # never leave requests hanging on an engine bug
            for seq in ready:
                self._fail(seq, as_pdorch_error(exc), outputs)
            return
        for seq, row in zip(ready, logits, strict=True):
            if seq.cancelled:
                continue  # released when the cancellation is taken from the inbox
            token, logprobs = self._draw(seq, row)
            seq.num_generated += 1
            seq.last_token = token
            reason = finish_reason(
                self.config, seq.sampling, seq.prompt_len, token, seq.num_generated, seq.output_offset
            )
            outputs.append(StepOutput(seq.request_id, token, reason, logprobs=logprobs))
            if reason is not None:
                del self._running[seq.request_id]
                self._finish(seq)

    def _draw(self, seq: EngineSequence, logits: np.ndarray) -> tuple[int, TokenLogprobs | None]:
        """The sequence's next token from the model's ``logits``, and its logprobs if asked for."""
        params, index = seq.sampling, seq.next_output_index
        drawn = (
            process_logits(logits, params, index, seq.history, self.config.eos_token_id)
            if needs_processing(params)
            else logits
        )
        token = sample(drawn, params, index)
        if seq.history is not None:
            seq.history.add(token)
        return token, token_logprobs(logits, token, params.logprobs) if params.logprobs >= 0 else None

    # ------------------------------------------------------------------ bookkeeping

    def _start_running(self, seq: EngineSequence) -> None:
        seq.admitted_at = next(self._admission_order)
        self._running[seq.request_id] = seq

    def _batch_slots_taken(self) -> int:
        """Running sequences plus the colocated prompts that will run once prefilled."""
        prefilling = sum(1 for s in self._prefilling.values() if s.kind is SequenceKind.GENERATE)
        return len(self._running) + prefilling

    def _blocks_needed_next_step(self) -> int:
        return sum(
            1 for s in self._running.values() if self.cache.blocks_for(s.feed_position + 2) > len(s.blocks)
        )

    def _fail(self, seq: EngineSequence, error: PdorchError, outputs: list[StepOutput]) -> None:
        for table in (self._prefilling, self._running):
            if table.get(seq.request_id) is seq:
                del table[seq.request_id]
        if not seq.cancelled:
            outputs.append(StepOutput.failure(seq.request_id, error))
        self._finish(seq)

    def _finish(self, seq: EngineSequence) -> None:
        self._release(seq)
        self._inbox.forget(seq)

    def _release(self, seq: EngineSequence) -> None:
        """Drop the sequence's block references; its cached prefix blocks stay cached."""
        blocks, seq.blocks = seq.blocks, []
        if blocks:
            self.allocator.free(blocks)
        adapter, seq.adapter = seq.adapter, None
        if adapter is not None:
            self.adapters.release(adapter)

    def _publish_stats(self) -> None:
        uncomputed = sum(s.prompt_len - s.num_computed for s in self._prefilling.values())
        self._inbox.publish(
            EngineStats(
                running=len(self._running) + len(self._prefilling),
                waiting=len(self._waiting) + len(self._pending_decode),
                queued_prefill_tokens=sum(s.prompt_len for s in self._waiting) + uncomputed,
            )
        )


def _salt(adapter: LoraAdapter | None) -> bytes:
    return adapter.salt if adapter is not None else b""
