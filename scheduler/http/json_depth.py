"""How deeply a JSON document nests, measured before anything parses it.

Parsers recurse: JSON nested a thousand levels deep (even inside a field nobody reads) exhausts
the decoder's recursion limit. :func:`nested_deeper_than` answers whether a body nests deeper
than a limit, in time linear in its size whatever it holds: a body with fewer brackets than the
limit cannot (one C-speed count); otherwise numpy finds the quotes that are not escaped, leaves
out the brackets between them (in strings) and takes the running count of the others. For a valid
document the answer is exact; an invalid one the decoder refuses anyway.
"""

from __future__ import annotations

import numpy as np

_BACKSLASH, _QUOTE = ord("\\"), ord('"')
# +1 for an opening bracket, -1 for a closing one, 0 for any other byte.
_STEP = np.zeros(256, np.int8)
_STEP[list(b"[{")] = 1
_STEP[list(b"]}")] = -1


def nested_deeper_than(body: bytes, limit: int) -> bool:
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    return json_depth(body) > limit


def json_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body`` (0 for a scalar)."""
    chars = np.frombuffer(body, np.uint8)
    if chars.size == 0:
        return 0
    quotes = chars == _QUOTE
    if b'\\"' in body:  # some quotes may be escaped: those after an odd run of backslashes
        at = np.flatnonzero(quotes)
        plain = np.flatnonzero(chars != _BACKSLASH)
        # The last byte before each quote that is not a backslash (-1: none); the run lies between.
        before = np.searchsorted(plain, at) - 1
        last_plain = np.where(before >= 0, plain[np.maximum(before, 0)], -1)
        escaped = (at - last_plain - 1) % 2 == 1
        quotes[at[escaped]] = False
    outside_strings = (np.cumsum(quotes, dtype=np.int32) & 1) == 0
    steps = np.where(outside_strings, _STEP[chars], 0)
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))
