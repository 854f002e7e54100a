"""Configuration of the real-time simulated engine (``pdorch worker --engine sim``)."""

from __future__ import annotations

import math
from types import MappingProxyType

import msgspec

from transport.errors import ErrorCode, PdorchError
from workers.engines.sim.cost import ModelShape, model_shapes


def model_context_lengths() -> MappingProxyType[str, int]:
    """Each modeled model's context window (its published ``max_position_embeddings``)."""
    return MappingProxyType({"llama-2-70b": 4096, "llama-3-8b": 8192})


class SimEngineConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the simulated engine models and how fast it runs.

    ``time_scale`` multiplies every modeled duration (compute and KV transfer): 1.0 is real speed,
    0.1 runs ten times faster, 0 models no time at all (a zero-cost engine: each job's tokens are
    there as soon as it is submitted, for load tests of everything but the engine). ``num_blocks``
    0 sizes the KV pool from device memory (as vLLM does:
    90% of ``tp`` devices' memory minus the weights); ``max_model_len`` 0 takes the model's context
    window (never more than the pool holds). ``mean_output_tokens`` sets how often EOS is drawn.
    """

    accelerator: str = "h100"
    model: str = "llama-3-8b"
    # Llama-3-8B fits on one device, but the cost model is calibrated for 2, 4 and 8.
    tp: int = 2
    model_name: str = ""  # the name served to clients; "" = ``model``
    time_scale: float = 1.0
    # Every modeled compute duration times this: a degraded instance of its class (a throttled or
    # failing part), for seeing what placement does with one.
    slowdown: float = 1.0
    kv_link_gbytes_per_s: float = 25.0
    max_batch: int = 256
    chunk_tokens: int = 512
    num_blocks: int = 0
    block_size: int = 16
    max_model_len: int = 0
    mean_output_tokens: float = 256.0
    enable_prefix_caching: bool = True
    seed: int = 0
    job_timeout_s: float = 600.0
    # LoRA: the adapters served (names only: nothing is loaded, a load costs ``adapter_load_s``
    # model seconds), of which ``max_loras`` are resident at once.
    adapters: tuple[str, ...] = ()
    max_loras: int = 4
    adapter_load_s: float = 0.1

    def __post_init__(self) -> None:
        checks = {
            "time_scale": self.time_scale >= 0 and math.isfinite(self.time_scale),
            "slowdown": self.slowdown > 0 and math.isfinite(self.slowdown),
            "kv_link_gbytes_per_s": self.kv_link_gbytes_per_s > 0,
            "max_batch": self.max_batch > 0,
            "chunk_tokens": self.chunk_tokens >= 0,
            "num_blocks": self.num_blocks >= 0,
            "block_size": self.block_size > 0,
            "max_model_len": self.max_model_len >= 0,
            "mean_output_tokens": self.mean_output_tokens >= 1,
            "job_timeout_s": self.job_timeout_s > 0,
            "max_loras": self.max_loras >= 1,
            "adapter_load_s": self.adapter_load_s >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise PdorchError(ErrorCode.CONFIG, f"bad simulated engine setting: {values}")
        shape_of(self.model)

    @property
    def served_name(self) -> str:
        return self.model_name or self.model


def shape_of(model: str) -> ModelShape:
    shapes = model_shapes()
    if model not in shapes:
        raise PdorchError(ErrorCode.CONFIG, f"unknown simulated model {model!r}; known: {sorted(shapes)}")
    return shapes[model]
