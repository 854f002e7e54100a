"""The Engine protocol: what the worker agent needs from whatever computes tokens.

The agent owns the control-plane socket and the job lifecycle: it runs each job as a task of its
own and cancels a job by cancelling that task. An engine owns compute and moving its KV (the
reference engine through pdorch's KV plane in-process, vLLM through its KV connector), and a job
method frees whatever the job holds (blocks, reservations, transfers) in its own ``finally``,
whether it finishes, fails or is cancelled.
Engines report progress through the ``emit`` callable given to ``start``: ``TokenOutput`` for
tokens (the first one from prefill, then decode's) and ``KvLoaded`` once a decode job holds the
whole KV. A job method returns when the job is over and raises :class:`PdorchError` on failure;
the agent turns that into a ``JobError`` for the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from transport.messages import DecodeJob, FromWorker, GenerateJob, Load, PrefillJob

Emit = Callable[[FromWorker], None]


class EngineInfo(msgspec.Struct, frozen=True):
    """What an engine tells the scheduler about itself (copied into ``Hello``)."""

    engine: str
    model: str
    kv_bytes_per_token: int
    block_size: int
    capacity_blocks: int
    max_model_len: int
    tokenizer: str = "byte"
    eos_token_id: int = -1
    vocab_size: int = 0
    # Set by engines that receive KV themselves (vLLM's connector); otherwise the agent's own
    # KV receiver endpoint is advertised.
    kv_endpoint: str = ""
    # The LoRA adapters it can serve (a job naming another is refused by the agent).
    adapters: tuple[str, ...] = ()


class Engine(Protocol):
    def info(self) -> EngineInfo: ...

    def load(self) -> Load: ...

    async def start(self, emit: Emit) -> None: ...

    async def close(self) -> None: ...

    async def healthy(self) -> bool:
        """False means the engine is gone for good; the agent reports the worker dead."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter in the PEFT directory ``path`` as ``name`` (replacing an idle one
        of that name). Raises :class:`PdorchError`: CONFIG if this engine serves no adapters,
        INVALID_REQUEST for an unusable directory."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Stop serving ``name``: new jobs naming it are refused; running ones finish with it.
        Raises MODEL_NOT_FOUND if it is not served."""
        ...

    async def prefill(self, job: PrefillJob) -> None: ...

    async def decode(self, job: DecodeJob) -> None: ...

    async def generate(self, job: GenerateJob) -> None: ...
