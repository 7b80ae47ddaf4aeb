"""Credits as exact integers of nano-credits (1e-9), so sums never drift."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["MAX_NANOS", "NANO", "cost_of", "format_credits", "parse_credits"]

NANO = 10**9
MAX_NANOS = 2**63 - 1
"""The largest amount SQLite's INTEGER holds (about 9.2 billion credits)."""


def parse_credits(text: str | int | float | Decimal) -> int:
    """'1.5' -> 1_500_000_000 nano-credits; rejects non-numbers and sub-nano precision."""
    try:
        value = Decimal(str(text))
    except InvalidOperation as exc:
        raise ValueError(f"not a number of credits: {text!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {text!r}")
    # Exact integer arithmetic on the digits: Decimal multiplication would round to the
    # context's 28 digits and could silently accept a value with more than 9 decimals.
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + 9
    if coefficient == 0:
        return 0
    if shift > len(str(MAX_NANOS)):
        raise ValueError(f"too many credits: {text!r}")
    nanos: int
    if shift >= 0:
        nanos = coefficient * 10**shift
    else:
        # A non-zero digit past the 9th decimal (length first: never build a huge power).
        if len(digits) < -shift or coefficient % 10 ** (-shift):
            raise ValueError(f"credits have at most 9 decimal places: {text!r}")
        nanos = coefficient // 10 ** (-shift)
    if nanos > MAX_NANOS:
        raise ValueError(f"too many credits: {text!r}")
    return -nanos if sign else nanos


def format_credits(nanos: int | None) -> Decimal | None:
    """nano-credits -> Decimal credits (None stays None: unlimited)."""
    if nanos is None:
        return None
    if not nanos:
        return Decimal(0)
    value = (Decimal(nanos) / NANO).normalize()
    # normalize() writes 100 as 1E+2; whole numbers keep their plain digits.
    return value.quantize(Decimal(1)) if value == value.to_integral_value() else value


def cost_of(tokens: int, per_million: int) -> int:
    """Cost in nano-credits of ``tokens`` at ``per_million`` nano-credits / 1M, rounded up."""
    return -(-tokens * per_million // 1_000_000)
