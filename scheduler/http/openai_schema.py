"""OpenAI request bodies as msgspec Structs, and their validation into one internal request.

Unknown fields are ignored (clients send many); fields we cannot honour (best_of, suffix, tools,
structured output) are refused with a clear 400 when set to anything but their neutral value,
rather than silently ignored: the client asked for something that would change the output.
vLLM's extensions are accepted: ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``,
``prompt_logprobs``, ``ignore_eos``, ``return_token_ids``.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, TypeVar

import msgspec

from scheduler.http.json_depth import nested_deeper_than
from transport.errors import ErrorCode, PdorchError

_T = TypeVar("_T")
# The most top log-probabilities one may ask for (OpenAI allows 20 for chat, vLLM by default 20).
MAX_TOP_LOGPROBS = 20
# The most choices one may ask for (OpenAI's limit on 'n').
MAX_CHOICES = 128


# vLLM's sampling extensions pdorch does not implement, with the values that change nothing; any
# other value is refused, as ignoring it would change the output silently.
NEUTRAL_EXTENSIONS: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "bad_words": (None, []),
    "allowed_token_ids": (None, []),
    "truncate_prompt_tokens": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
}


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    # The field that says how many top log-probabilities per generated token (for errors).
    LOGPROBS_FIELD: ClassVar[str] = "logprobs"

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (vLLM-compatible): return the generated token ids, keep going past EOS, ...
    return_token_ids: bool = False
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    priority: int = 0
    top_k: int | None = None  # -1 or 0: no cut, as vLLM
    min_p: float | None = None
    # Refused unless neutral (NEUTRAL_EXTENSIONS).
    use_beam_search: Any = None
    length_penalty: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    truncate_prompt_tokens: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None

    def unsupported(self) -> str:
        """Why a field is set to something we cannot honour ("" if none is)."""
        if not 1 <= self.n <= MAX_CHOICES:
            return f"'n' must be between 1 and {MAX_CHOICES}"
        if self.best_of not in (None, 1, self.n):
            return "'best_of' other than n is not supported"
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            return f"'prompt_logprobs' must be between 0 and {MAX_TOP_LOGPROBS}"
        for name, neutral in NEUTRAL_EXTENSIONS.items():
            if getattr(self, name) not in neutral:
                return f"'{name}' is not supported"
        return ""

    def token_logprobs(self) -> int:
        """How many top log-probabilities per generated token (-1: none)."""
        raise NotImplementedError

    def wanted_prompt_logprobs(self) -> int:
        return -1 if self.prompt_logprobs is None else self.prompt_logprobs


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[Any]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None

    def unsupported(self) -> str:
        if self.suffix:
            return "'suffix' is not supported"
        if self.logprobs is not None and self.logprobs < 0:
            return f"'logprobs' must be between 0 and {MAX_TOP_LOGPROBS}"
        return super().unsupported()

    def token_logprobs(self) -> int:
        return -1 if self.logprobs is None else self.logprobs

    def wanted_prompt_logprobs(self) -> int:
        # echo with logprobs: the prompt's tokens get them too (what log-likelihood evaluations send).
        if self.echo and self.logprobs is not None:
            return max(self.logprobs, super().wanted_prompt_logprobs())
        return super().wanted_prompt_logprobs()


class ContentPart(msgspec.Struct):
    type: str
    text: str = ""


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    LOGPROBS_FIELD: ClassVar[str] = "top_logprobs"

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    response_format: Any = None

    def token_logprobs(self) -> int:
        if not self.logprobs:
            return -1
        return 0 if self.top_logprobs is None else self.top_logprobs

    def unsupported(self) -> str:
        if self.top_logprobs and not self.logprobs:
            return "'top_logprobs' needs 'logprobs': true"
        if self.tools:
            return "'tools' (function calling) are not supported"
        if self.response_format is not None and self.response_format != {"type": "text"}:
            return '\'response_format\' is not supported (only {"type": "text"})'
        return super().unsupported()


class TokenizeRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``/tokenize``: a prompt, or chat messages (rendered with the model's template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    tokens: list[int]


# What an adapter may be called (it is a model name in requests, metrics and logs) and where it may
# be read from: checked when the body is decoded, and published in /openapi.json.
# (The patterns end with "(?![\\s\\S])", not "$": Python's "$" also matches before a final newline.)
LoraName = Annotated[
    str,
    msgspec.Meta(
        pattern="^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}(?![\\s\\S])",
        description="1-128 characters: letters, digits and ._:/@+- (not first)",
    ),
]
LoraPath = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=4096,
        pattern="^[^\\x00]+(?![\\s\\S])",
        description="a path the workers can read",
    ),
]


class LoadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    """vLLM's ``/v1/load_lora_adapter``; ``base_model`` is pdorch's, needed only when the cluster
    serves several models."""

    lora_name: LoraName
    lora_path: LoraPath
    load_inplace: bool = False
    base_model: str | None = None


class UnloadLoraAdapterRequest(msgspec.Struct, kw_only=True):
    lora_name: LoraName


# Every request body the scheduler decodes (parse_body).
REQUEST_KINDS: tuple[type, ...] = (
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
_DECODERS: dict[type, msgspec.json.Decoder[Any]] = {k: msgspec.json.Decoder(k) for k in REQUEST_KINDS}


def bad(message: str) -> PdorchError:
    return PdorchError(ErrorCode.INVALID_REQUEST, message)


_UTF8_BOM = b"\xef\xbb\xbf"


def parse_body(body: bytes, kind: type[_T], max_depth: int = 32) -> _T:
    """The request in ``body``; INVALID_REQUEST if it is not one, or nests deeper than ``max_depth``
    (anywhere, unknown fields included: the decoder would recurse into them)."""
    if body.startswith(_UTF8_BOM):  # JSON must not carry one, but may be read past it (RFC 8259)
        body = body[len(_UTF8_BOM) :]
    if not body.strip():
        raise bad("request body is empty; expected a JSON object")
    too_deep = bad(f"request body nests arrays and objects deeper than {max_depth} levels")
    if nested_deeper_than(body, max_depth):
        raise too_deep
    try:
        try:
            return _DECODERS[kind].decode(body)
        except msgspec.ValidationError:
            if b"null" not in body:
                raise
            # OpenAI's API (and vLLM's) takes null for any optional field, meaning "not given";
            # clients send it. The typed decoder does not: decode again without them.
            return msgspec.convert(_without_nulls(msgspec.json.decode(body)), kind)
    except msgspec.ValidationError as e:
        raise bad(f"invalid request: {e}") from None
    except msgspec.DecodeError as e:
        raise bad(f"request body is not valid JSON: {e}") from None
    except RecursionError:  # the interpreter's limit, lower than ours in a deep call stack
        raise too_deep from None


def _without_nulls(value: Any) -> Any:
    """``value`` with every object member whose value is null left out, at any depth."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def completion_prompts(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each text or token ids: one, or a batch (a list of
    strings, or of token id lists), each answered as its own request (choices numbered prompt by
    prompt, ``n`` each, as vLLM and OpenAI do)."""
    prompt: Any = req.prompt
    if isinstance(prompt, str) or all(_is_token(t) for t in prompt):
        prompts = [prompt]
    elif all(isinstance(p, str) or (isinstance(p, list) and all(_is_token(t) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad("'prompt' must be a string, a list of token ids, or a list of either (a batch)")
    if not all(prompts):
        raise bad("'prompt' is empty")
    if len(prompts) * req.n > MAX_CHOICES:
        raise bad(
            f"{len(prompts)} prompts with 'n' {req.n} make {len(prompts) * req.n} choices; "
            f"at most {MAX_CHOICES} per request"
        )
    return prompts


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_messages(req: ChatCompletionRequest) -> list[tuple[str, str]]:
    if not req.messages:
        raise bad("'messages' is empty")
    out = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise bad(f"messages[{i}].role {m.role!r} is not one of system, user, assistant, developer, tool")
        if m.content is None:
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            if any(p.type != "text" for p in m.content):
                raise bad(f"messages[{i}].content: only 'text' parts are supported")
            text = "".join(p.text for p in m.content)
        out.append((m.role, text))
    return out


def stop_strings(req: _Sampling) -> list[str]:
    if req.stop is None:
        return []
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    if len(stops) > 16:
        raise bad("'stop' takes at most 16 strings")
    return [s for s in stops if s]


def check_common(req: _Sampling, max_tokens: int | None, *, default_max: int, limit: int) -> int:
    """Validate sampling fields; returns the effective max_tokens."""
    problem = req.unsupported()
    if problem:
        raise bad(problem)
    for name, value in (
        (req.LOGPROBS_FIELD, req.token_logprobs()),
        ("prompt_logprobs", req.wanted_prompt_logprobs()),
    ):
        if not -1 <= value <= MAX_TOP_LOGPROBS:
            raise bad(f"'{name}' must be between 0 and {MAX_TOP_LOGPROBS}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise bad(f"'{name}' must be between -2 and 2")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise bad("'repetition_penalty' must be in (0, 10]")
    if req.min_tokens < 0:
        raise bad("'min_tokens' must not be negative")
    for key, bias in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise bad(f"'logit_bias' keys are token ids; got {key!r}")
        if not -100.0 <= bias <= 100.0:
            raise bad(f"'logit_bias' values must be between -100 and 100; got {bias} for {key}")
    if req.temperature is not None and not 0.0 <= req.temperature <= 2.0:
        raise bad("'temperature' must be between 0 and 2")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise bad("'top_p' must be in (0, 1]")
    if req.top_k is not None and req.top_k < -1:
        raise bad("'top_k' must be -1 or 0 (no cut) or a number of tokens")
    if req.min_p is not None and not 0.0 <= req.min_p <= 1.0:
        raise bad("'min_p' must be between 0 and 1")
    if req.seed is not None and not -(2**63) <= req.seed < 2**64:
        raise bad("'seed' is out of range")
    effective = default_max if max_tokens is None else max_tokens
    if effective < 1:
        raise bad("'max_tokens' must be at least 1")
    if effective > limit:
        raise bad(f"'max_tokens' must be at most {limit}")
    if req.min_tokens > effective:
        raise bad(f"'min_tokens' ({req.min_tokens}) must not exceed 'max_tokens' ({effective})")
    return effective
