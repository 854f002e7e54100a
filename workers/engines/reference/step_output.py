"""What one engine step reports for one request."""

from __future__ import annotations

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, TokenLogprobs


class StepOutput(msgspec.Struct, frozen=True, gc=False):
    """A new token (``token_id``, with ``finish_reason`` on the last one) or a request failure.

    A failed request has ``error`` set and ``token_id == -1``; the core has already released
    everything the request held. A request's first output (token 0, from its prefill) carries
    ``cached_tokens``: how many prompt tokens were served from the prefix cache, not computed.
    """

    request_id: str
    token_id: int = -1
    finish_reason: FinishReason | None = None
    error: ErrorCode | None = None
    message: str = ""
    cached_tokens: int = 0
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    prompt_logprobs: list[TokenLogprobs] | None = None  # on the first output, when asked for

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def finished(self) -> bool:
        """The request is over: last token emitted, or failed."""
        return self.error is not None or self.finish_reason is not None

    def as_error(self) -> PdorchError:
        if self.error is None:
            raise PdorchError(ErrorCode.INTERNAL, f"step output for {self.request_id} is not an error")
        return PdorchError(self.error, self.message)

    @classmethod
    def failure(cls, request_id: str, error: PdorchError) -> StepOutput:
        return cls(request_id=request_id, error=error.code, message=error.message)
