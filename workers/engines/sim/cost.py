"""Cost model of the simulated engine: how long a prefill chunk or a decode step takes, how much KV fits.

Every function here is pure arithmetic, so the same model drives the virtual-time simulator and a
real-time ``sim`` worker. Coefficients for Llama-2-70B on A100 and H100 (tensor parallel 2/4/8) were
fitted on public measurements (Splitwise's ``perf_model.csv``, see ``calibration.py``, which
refits them and reports the error); the L40S-like class is derived from the A100 fit by compute and
memory-bandwidth ratios; other model shapes are scaled from the 70B fit by parameter count.

The model's shape:

* prefill of prompt positions ``[start, end)`` (positions before ``start`` are cached):
  ``a + b * ((end - start) + kappa * (end**2 - start**2))`` ms. ``kappa`` is the model's attention
  FLOPs per (token, context position) over its dense FLOPs per token (``d_model * layers / params``),
  a FlashAttention-like quadratic term fixed by the shape rather than fitted, because the measured
  quadratic growth (prompts <= 8k) extrapolates to a minute for a 66k-token prompt.
* decode step for ``batch`` sequences holding ``context`` KV tokens in total:
  ``d0 + d1 * batch + d2 * context`` ms, with ``d2`` = KV bytes read per token / (HBM bandwidth x
  0.7), again fixed by physics because batch and context are confounded in the measurements.
* a mixed (chunked-prefill) iteration costs the chunk plus the decode step's marginal part
  (``d1 * batch + d2 * context``): the weights are read once for both (Sarathi-Serve's piggybacking).
"""

from __future__ import annotations

import math
from types import MappingProxyType

import msgspec

from transport.errors import ErrorCode, PdorchError

# Effective share of peak HBM bandwidth a decode step reaches when reading KV (documented assumption).
HBM_EFFICIENCY = 0.7
# Share of device memory an engine may use (vLLM's gpu_memory_utilization default).
MEMORY_UTILIZATION = 0.9


class ModelShape(msgspec.Struct, frozen=True):
    name: str
    params: float  # parameter count
    layers: int
    d_model: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def attention_kappa(self) -> float:
        return self.d_model * self.layers / self.params


class AcceleratorClass(msgspec.Struct, frozen=True):
    """Per-device figures of one accelerator class (dense bf16 TFLOPS, HBM GB/s, memory GB)."""

    name: str
    tflops: float
    hbm_gbytes_per_s: float
    memory_gb: float


class CostCoefficients(msgspec.Struct, frozen=True):
    """Fitted coefficients for one (accelerator class, tensor-parallel size) of the reference model."""

    prefill_fixed_ms: float  # a
    prefill_per_token_ms: float  # b
    decode_fixed_ms: float  # d0
    decode_per_seq_ms: float  # d1


LLAMA2_70B = ModelShape("llama-2-70b", params=69e9, layers=80, d_model=8192, kv_heads=8, head_dim=128)
LLAMA3_8B = ModelShape("llama-3-8b", params=8.03e9, layers=32, d_model=4096, kv_heads=8, head_dim=128)
# The shape the measurements were taken on; other shapes are scaled from it.
REFERENCE_SHAPE = LLAMA2_70B


def model_shapes() -> MappingProxyType[str, ModelShape]:
    return MappingProxyType({s.name: s for s in (LLAMA2_70B, LLAMA3_8B)})


def accelerator_classes() -> MappingProxyType[str, AcceleratorClass]:
    return MappingProxyType(
        {
            "a100": AcceleratorClass("a100", tflops=312.0, hbm_gbytes_per_s=2039.0, memory_gb=80.0),
            "h100": AcceleratorClass("h100", tflops=989.0, hbm_gbytes_per_s=3350.0, memory_gb=80.0),
            "l40s": AcceleratorClass("l40s", tflops=362.0, hbm_gbytes_per_s=864.0, memory_gb=48.0),
        }
    )


# Fitted by calibration.fit_all() on perf_model.csv (Llama-2-70B rows, anomalies removed).
# Regenerate with: python -m workers.engines.sim.calibration <perf_model.csv>
_FITTED: MappingProxyType[tuple[str, int], CostCoefficients] = MappingProxyType(
    {
        ("a100", 2): CostCoefficients(34.330, 0.32017, 56.765, 0.44430),
        ("a100", 4): CostCoefficients(29.590, 0.19715, 43.713, 0.35250),
        ("a100", 8): CostCoefficients(33.024, 0.12593, 44.459, 0.35592),
        ("h100", 2): CostCoefficients(20.527, 0.13150, 36.789, 0.40578),
        ("h100", 4): CostCoefficients(22.151, 0.08336, 28.909, 0.29971),
        ("h100", 8): CostCoefficients(26.620, 0.06041, 30.095, 0.28637),
    }
)

# L40S-like from A100: prefill is compute-bound (scale by TFLOPS, plus a PCIe all-reduce penalty:
# no NVLink); decode is bandwidth-bound (scale by HBM bandwidth).
L40S_PCIE_PENALTY = 1.2


def fitted_coefficients() -> MappingProxyType[tuple[str, int], CostCoefficients]:
    table = dict(_FITTED)
    a100, l40s = accelerator_classes()["a100"], accelerator_classes()["l40s"]
    compute = a100.tflops / l40s.tflops * L40S_PCIE_PENALTY
    memory = a100.hbm_gbytes_per_s / l40s.hbm_gbytes_per_s
    for tp in (2, 4, 8):
        c = _FITTED[("a100", tp)]
        table[("l40s", tp)] = CostCoefficients(
            c.prefill_fixed_ms * compute,
            c.prefill_per_token_ms * compute,
            c.decode_fixed_ms * memory,
            c.decode_per_seq_ms * memory,
        )
    return MappingProxyType(table)


class CostModel:
    """Timing and KV capacity of one engine instance (``tp`` devices of one class, one model)."""

    def __init__(
        self,
        accelerator: str,
        tp: int = 4,
        shape: ModelShape = LLAMA2_70B,
        memory_utilization: float = MEMORY_UTILIZATION,
        *,
        slowdown: float = 1.0,
    ) -> None:
        """``slowdown``: every duration times this (a degraded instance of the class: throttled,
        a failing part, a noisy neighbour)."""
        if not (math.isfinite(slowdown) and slowdown > 0):
            raise PdorchError(ErrorCode.CONFIG, f"slowdown must be a positive number, got {slowdown}")
        classes = accelerator_classes()
        if accelerator not in classes:
            raise PdorchError(
                ErrorCode.CONFIG, f"unknown accelerator class {accelerator!r}; known: {sorted(classes)}"
            )
        coeffs = fitted_coefficients().get((accelerator, tp))
        if coeffs is None:
            raise PdorchError(ErrorCode.CONFIG, f"no calibration for {accelerator} with tensor parallel {tp}")
        self.accelerator = classes[accelerator]
        self.tp = tp
        self.shape = shape
        scale = shape.params / REFERENCE_SHAPE.params * slowdown
        self.a = coeffs.prefill_fixed_ms * scale
        self.b = coeffs.prefill_per_token_ms * scale
        self.kappa = shape.attention_kappa
        self.d0 = coeffs.decode_fixed_ms * scale
        self.d1 = coeffs.decode_per_seq_ms * scale
        # KV bytes read per context token per device, at effective bandwidth, in ms.
        per_device = shape.kv_bytes_per_token / tp
        self.d2 = per_device / (self.accelerator.hbm_gbytes_per_s * 1e9 * HBM_EFFICIENCY) * 1e3 * slowdown
        usable = self.accelerator.memory_gb * 1e9 * tp * memory_utilization - shape.weight_bytes
        if usable <= 0:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"{shape.name} does not fit on {tp} x {accelerator} ({usable / 1e9:.0f} GB left)",
            )
        self.kv_capacity_tokens = int(usable // shape.kv_bytes_per_token)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.shape.kv_bytes_per_token

    def prefill_ms(self, start: int, end: int) -> float:
        """One prefill iteration computing prompt positions ``[start, end)``."""
        n = end - start
        if n <= 0:
            return 0.0
        return self.a + self.b * (n + self.kappa * (end * end - start * start))

    def decode_step_ms(self, batch: int, context_tokens: float) -> float:
        if batch <= 0:
            return 0.0
        return self.d0 + self.d1 * batch + self.d2 * context_tokens

    def decode_marginal_ms(self, batch: int, context_tokens: float) -> float:
        """What a decode step adds to an iteration that already runs a prefill chunk."""
        if batch <= 0:
            return 0.0
        return self.d1 * batch + self.d2 * context_tokens

    def prefill_tokens_per_s(self, prompt_tokens: int = 2048) -> float:
        """Throughput on an uncached prompt of typical length (what placement uses as the node's rate)."""
        return prompt_tokens / (self.prefill_ms(0, prompt_tokens) / 1e3)

    def isolated_prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill_ms(0, prompt_tokens) / 1e3


def parse_instance_class(text: str, default_tp: int = 4) -> tuple[str, int]:
    """``"h100"`` or ``"h100x8"`` -> (class, tensor-parallel size)."""
    name, sep, tp_text = text.strip().lower().partition("x")
    if not sep:
        return name, default_tp
    try:
        tp = int(tp_text)
    except ValueError:
        raise PdorchError(
            ErrorCode.CONFIG, f"bad instance class {text!r}; expected CLASS or CLASSxTP"
        ) from None
    if tp <= 0 or not math.isfinite(tp):
        raise PdorchError(ErrorCode.CONFIG, f"bad tensor-parallel size in {text!r}")
    return name, tp
