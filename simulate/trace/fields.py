"""Reading one field of a trace row: counts and timestamps, each refused with where it was."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from transport.errors import ErrorCode, PdorchError

# "2023-11-16 18:17:03.9799600" (Azure 2023: naive, seven fractional digits, more than strptime's
# %f takes), "2024-05-10 00:00:00.009930+00:00" (Azure 2024: an offset), ISO 8601 with "T" or "Z".
_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(\.\d+)?\s*(Z|[+-]\d{2}:?\d{2})?")


def bad_row(where: str, message: str) -> PdorchError:
    return PdorchError(ErrorCode.CONFIG, f"{where}: {message}")


def token_count(value: object, where: str, field: str) -> int:
    """A token count: a non-negative whole number (written as an int or a float such as "12.0")."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_row(where, f"{field} is not a number: {value!r}") from None
    if not (math.isfinite(number) and number >= 0 and number == int(number)):
        raise bad_row(where, f"{field} must be a whole number >= 0, got {value!r}")
    return int(number)


def seconds(value: object, where: str, field: str, *, per_second: float = 1.0) -> float:
    """A timestamp in seconds: a number of ``1 / per_second`` units or a date and time (naive = UTC)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    else:
        text = str(value).strip()
        try:
            number = float(text)
        except ValueError:
            return _datetime_s(text, where, field)
    if not math.isfinite(number):
        raise bad_row(where, f"{field} must be finite, got {value!r}")
    return number / per_second


def _datetime_s(text: str, where: str, field: str) -> float:
    m = _DATETIME.fullmatch(text)
    if m is None:
        raise bad_row(where, f"{field} is neither a number nor a date and time: {text!r}")
    day, clock, fraction, zone = m.groups()
    try:
        at = datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise bad_row(where, f"{field} is not a valid date and time: {text!r}") from None
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        digits = zone[1:].replace(":", "")
        at -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    return at.timestamp() + (float(fraction) if fraction else 0.0)
