"""Control-plane messages between the scheduler and worker agents.

Every message is a msgspec Struct in one of two tagged unions: :data:`ToWorker` (scheduler ->
agent) and :data:`FromWorker` (agent -> scheduler). KV-plane messages live in
``transport/kv/messages.py``. Structs are ``array_like`` (compact positional encoding),
``omit_defaults`` and ``gc=False`` (they hold no reference cycles), following vLLM's wire structs.

Compatibility rule: fields are only ever appended with defaults; a change that an old peer cannot
decode bumps :data:`PROTOCOL_VERSION`, which is checked in ``Hello``.
"""

from __future__ import annotations

import enum
from typing import Annotated

import msgspec
import numpy as np

from transport.token_ids import message_token_ids

# 2: a job's prompt is a packed int32 array (transport/token_ids.py), no longer a list.
# 3: an agent sends the job messages it has ready at once as one message (JobMessages), and
# says where each TokenOutput's tokens are in the request's output (TokenOutput.index).
# 4: the decode side says its KV is arriving while a handoff goes on (KvArriving).
PROTOCOL_VERSION = 4
# The most messages one JobMessages may carry (an agent splits more; the scheduler drops a longer one).
MAX_JOB_MESSAGES = 1024

_STRUCT = {"array_like": True, "omit_defaults": True, "gc": False, "tag_field": "t"}


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    BOTH = "both"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop string/token
    LENGTH = "length"  # max_tokens or the model's context limit


class SamplingParams(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """How to pick tokens. ``temperature == 0`` is greedy.

    Seeded sampling draws the n-th generated token from an RNG seeded with ``(seed, n)``, so the
    prefill worker (token 0) and the decode worker (tokens 1..) agree without sharing RNG state.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    # Log-probabilities of each generated token (-1: none; k >= 0: the token's and the k most
    # likely), and of each prompt token after the first (prompt_logprobs, from the prefill side).
    # They are the model's own (log-softmax of its logits), before penalties and temperature.
    logprobs: int = -1
    prompt_logprobs: int = -1
    # OpenAI's presence and frequency penalties count the request's output tokens; vLLM's
    # repetition penalty divides the logits of every token seen in the prompt or the output.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    # EOS and stop_token_ids cannot end the output before it has this many tokens.
    min_tokens: int = 0
    # Sample only among the top_k most likely tokens (0: all), and among those at least min_p times
    # as likely as the most likely one (0: all); applied with temperature, before top_p.
    top_k: int = 0
    min_p: float = 0.0

    @property
    def penalized(self) -> bool:
        """Does sampling depend on the tokens seen so far (not only on the logits)?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class TokenLogprobs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One token's log-probability and, when asked for, the most likely tokens' at its position."""

    logprob: float
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class KvMode(enum.StrEnum):
    P2P = "p2p"  # prefill agent -> decode agent's own KV endpoint
    CENTRALIZED = "centralized"  # prefill agent -> KV broker -> decode agent


class KvRoute(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """Where a request's KV goes (prefill side) or comes from (decode side).

    ``P2P``: endpoint = the decode agent's KV endpoint; the decode side receives on its own
    endpoint and ignores ``endpoint``. ``CENTRALIZED``: endpoint = the KV broker, for both sides.
    ``transfer_id`` is ``<sender's key name>/<random>`` when the planes are authenticated: a KV
    server accepts a transfer only from a peer authenticated under the name it starts with.
    """

    mode: KvMode
    endpoint: str
    transfer_id: str
    # The CURVE public key (Z85) of the server at ``endpoint`` (the decode worker's, the broker's),
    # which the connecting side pins; "" when the KV plane does not run CURVE.
    server_key: str = ""


class Load(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    blocks_used: int = 0
    blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    # Blocks holding cached prefixes that no request uses now: reusable free space, NOT counted in
    # blocks_used (blocks_used + free + cached_blocks == blocks_total).
    cached_blocks: int = 0
    # The worker's KV endpoint refused a transfer for lack of room lately (every slot busy): it
    # cannot take new handoffs until that passes (placement leaves it out meanwhile).
    kv_refusing: bool = False
    # LoRA: how many adapters the engine can hold at once (0 = it serves none) and which it holds
    # now, least recently used first: a request for a resident adapter pays no load.
    adapter_slots: int = 0
    adapters_resident: list[str] = []
    # Tokens this worker has decoded since it started (a counter: placement learns the decode step
    # time from how fast it grows while requests decode).
    decoded_tokens: int = 0


# --------------------------------------------------------------------------- agent -> scheduler


class Hello(msgspec.Struct, tag="hello", **_STRUCT):
    """First message on every (re)connection. The scheduler answers Welcome or Disconnect."""

    protocol_version: int
    worker_id: str
    role: Role
    engine: str
    model: str
    kv_bytes_per_token: int
    block_size: int
    capacity_blocks: int
    accelerator: str = "cpu"
    kv_endpoint: str = ""
    max_model_len: int = 0
    # How the scheduler should tokenize for this model: "byte" or a path to tokenizer.json.
    tokenizer: str = "byte"
    eos_token_id: int = -1
    vocab_size: int = 0  # 0 = unknown; else prompt token ids are checked against it
    # Free-form labels (e.g. the Kubernetes pod name and LWS group index).
    labels: dict[str, str] = {}
    # Unused: it carried a shared control token before the planes were authenticated with CURVE
    # keys. Kept so that the fields after it (none yet) keep their positions.
    token: str = ""
    # The LoRA adapters this worker serves (by name; each job may ask for one).
    adapters: list[str] = []
    # The adapters loaded at run time (``AdapterLoad``) -> the path each was read from: a scheduler
    # that restarts learns from them what to load on workers that join later.
    adapter_paths: dict[str, str] = {}


class Heartbeat(msgspec.Struct, tag="hb", **_STRUCT):
    """Sent both ways. From an agent it carries the current load."""

    load: Load | None = None


class TokenOutput(msgspec.Struct, tag="tok", **_STRUCT):
    """Tokens for one request, in order. ``finish_reason`` set on the last message."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    # Prompt tokens served from a prefix cache (for usage accounting and the predictor).
    cached_tokens: int = 0
    # With ``sampling.logprobs`` >= 0: one entry per token of ``token_ids``.
    logprobs: list[TokenLogprobs] = []
    # With ``sampling.prompt_logprobs`` >= 0, on the prefill side's first message: one entry per
    # prompt token after the first (the first has none).
    prompt_logprobs: list[TokenLogprobs] = []
    # Where its first token is in the request's output (the agent counts from its job's
    # ``generated``): the scheduler takes tokens only in order, so a lost message is a failed
    # attempt (resumed), never a gap in the output. -1: not said (not checked).
    index: int = -1


class KvLoaded(msgspec.Struct, tag="kvok", **_STRUCT):
    """The decode side holds the request's whole KV; from here on the handoff cannot be redone.

    It repeats token 0 (from the KV trailer): the prefill worker's ``TokenOutput`` travels on
    another connection and may arrive later, and decode's tokens 1.. follow this message.
    """

    request_id: str
    first_token: int = -1


class KvArriving(msgspec.Struct, tag="kvon", **_STRUCT):
    """The job's KV is arriving at the decode side: chunks came in since it last said so (at most
    once a second per job). A handoff is stalled only when no KV arrives for a while: one over a slow
    link that keeps moving is not."""

    request_id: str


class JobError(msgspec.Struct, tag="jerr", **_STRUCT):
    """A request-scoped failure. The worker stays healthy."""

    request_id: str
    code: str
    message: str


class WorkerFatal(msgspec.Struct, tag="fatal", **_STRUCT):
    """The worker cannot go on (engine died). The scheduler drops it and fails its requests."""

    message: str


class Draining(msgspec.Struct, tag="drain", **_STRUCT):
    """The worker is shutting down: place nothing new here; in-flight jobs still finish."""

    reason: str = ""


# The files of a Hugging Face tokenizer that a scheduler needs (all optional but tokenizer.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "config.json",
)


class TokenizerFiles(msgspec.Struct, tag="tokfiles", **_STRUCT):
    """The worker's tokenizer (``Hello.tokenizer`` names it), sent right after ``Welcome`` so a
    scheduler that cannot read the worker's disk (another pod) tokenizes exactly as the engine does.
    Keys are names from :data:`TOKENIZER_FILES`."""

    files: dict[str, bytes]


class Goodbye(msgspec.Struct, tag="bye", **_STRUCT):
    """Graceful shutdown: no new jobs; in-flight ones were finished or reported."""

    reason: str = ""


class AdapterAck(msgspec.Struct, tag="lora_ack", **_STRUCT):
    """The answer to ``AdapterLoad`` / ``AdapterUnload``: the adapters served now, and the error
    (a ``transport.errors.ErrorCode`` value and why) if the operation failed."""

    op_id: str
    adapters: list[str]
    code: str = ""
    message: str = ""


# What an agent says about one of its jobs (the scheduler hands each to the job's request).
JobMessage = TokenOutput | KvLoaded | KvArriving | JobError


class JobMessages(msgspec.Struct, tag="jobs", **_STRUCT):
    """Job messages an agent made in one turn of its event loop, in the order it made them, sent as
    one message: under load a decode agent ends several requests at once (each a ``KvLoaded`` and
    its tokens), and a batch's tokens are one message, where each was a message of its own (a send,
    a receive and a wake-up of both ends' ZeroMQ threads). Handled as those messages in order."""

    messages: Annotated[list[JobMessage], msgspec.Meta(max_length=MAX_JOB_MESSAGES)]


FromWorker = (
    Hello
    | Heartbeat
    | TokenOutput
    | KvLoaded
    | KvArriving
    | JobError
    | JobMessages
    | WorkerFatal
    | Draining
    | TokenizerFiles
    | Goodbye
    | AdapterAck
)

# --------------------------------------------------------------------------- scheduler -> agent


class Welcome(msgspec.Struct, tag="welcome", **_STRUCT):
    protocol_version: int
    worker_id: str
    heartbeat_interval_s: float
    heartbeat_liveness: int


class Disconnect(msgspec.Struct, tag="disconnect", **_STRUCT):
    """Registration refused or lost (e.g. unknown worker, version mismatch). Agent re-Hellos."""

    reason: str
    code: str = "protocol_mismatch"


# Jobs are addressed by ``request_id``, which is the scheduler's id of one *attempt* at a request
# (a request moved to other workers after a failure gets a new one), so a late message of an
# abandoned attempt is never taken for the current one.
#
# ``generated`` > 0 resumes a request: the last ``generated`` prompt tokens are its own output so
# far, the first token the job samples has output index ``generated`` (seeded sampling draws it as
# an uninterrupted run would), and ``sampling.max_tokens`` still counts the whole output.


class PrefillJob(msgspec.Struct, tag="prefill", **_STRUCT):
    """Compute the prompt's KV and the first token. ``kv`` None means no handoff (finish here)."""

    request_id: str
    prompt_token_ids: np.ndarray  # int32, 1-D (a list is packed): transport/token_ids.py
    sampling: SamplingParams
    kv: KvRoute | None = None
    deadline_s: float = 60.0
    generated: int = 0
    # A LoRA adapter the worker has loaded ("" = the base model); prefill and decode use the same.
    adapter: str = ""

    def __post_init__(self) -> None:
        self.prompt_token_ids = message_token_ids(self.prompt_token_ids)


class DecodeJob(msgspec.Struct, tag="decode", **_STRUCT):
    """Receive the request's KV per ``kv`` and generate tokens 1.. (token 0 came from prefill)."""

    request_id: str
    prompt_token_ids: np.ndarray  # int32, 1-D (a list is packed): transport/token_ids.py
    sampling: SamplingParams
    kv: KvRoute
    deadline_s: float = 60.0
    generated: int = 0
    # A LoRA adapter the worker has loaded ("" = the base model); prefill and decode use the same.
    adapter: str = ""

    def __post_init__(self) -> None:
        self.prompt_token_ids = message_token_ids(self.prompt_token_ids)


class GenerateJob(msgspec.Struct, tag="generate", **_STRUCT):
    """Colocated: prefill and decode on this one worker, no handoff."""

    request_id: str
    prompt_token_ids: np.ndarray  # int32, 1-D (a list is packed): transport/token_ids.py
    sampling: SamplingParams
    deadline_s: float = 60.0
    generated: int = 0
    # A LoRA adapter the worker has loaded ("" = the base model); prefill and decode use the same.
    adapter: str = ""

    def __post_init__(self) -> None:
        self.prompt_token_ids = message_token_ids(self.prompt_token_ids)


class Cancel(msgspec.Struct, tag="cancel", **_STRUCT):
    request_id: str


class AdapterLoad(msgspec.Struct, tag="lora_load", **_STRUCT):
    """Serve the LoRA adapter at ``path`` (on the worker's disk) as ``name``; answered by AdapterAck."""

    op_id: str
    name: str
    path: str


class AdapterUnload(msgspec.Struct, tag="lora_unload", **_STRUCT):
    """Stop serving ``name``: no new job may use it; running ones finish. Answered by AdapterAck."""

    op_id: str
    name: str


ToWorker = (
    Welcome
    | Disconnect
    | Heartbeat
    | PrefillJob
    | DecodeJob
    | GenerateJob
    | Cancel
    | AdapterLoad
    | AdapterUnload
)
