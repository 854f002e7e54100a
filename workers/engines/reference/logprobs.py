"""Log-probabilities a client asked for: the model's own, read off its logits.

They are log-softmax of the logits the model produced (before bias, penalties and temperature),
as vLLM reports them by default; the most likely tokens are ordered by log-probability, then by
token id, so ties come out the same on every worker.
"""

from __future__ import annotations

import numpy as np

from transport.messages import TokenLogprobs


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_logprobs(logits: np.ndarray, token: int, top: int) -> TokenLogprobs:
    """``token``'s log-probability at this position, and the ``top`` most likely tokens'."""
    lp = log_softmax(logits)
    if top <= 0:
        return TokenLogprobs(float(lp[token]))
    top = min(top, lp.shape[0])
    candidates = np.argpartition(-lp, top - 1)[:top]
    order = sorted(candidates.tolist(), key=lambda t: (-lp[t], t))
    return TokenLogprobs(float(lp[token]), order, [float(lp[t]) for t in order])
