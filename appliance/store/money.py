"""Credits as exact integers of nano-credits (1e-9), so sums never drift."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["NANO", "cost_of", "format_credits", "parse_credits"]

NANO = 10**9


def parse_credits(text: str | int | float | Decimal) -> int:
    """'1.5' -> 1_500_000_000 nano-credits; rejects non-numbers and sub-nano precision."""
    try:
        value = Decimal(str(text))
    except InvalidOperation as exc:
        raise ValueError(f"not a number of credits: {text!r}") from exc
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {text!r}")
    nanos = value * NANO
    if nanos != nanos.to_integral_value():
        raise ValueError(f"credits have at most 9 decimal places: {text!r}")
    return int(nanos)


def format_credits(nanos: int | None) -> Decimal | None:
    """nano-credits -> Decimal credits (None stays None: unlimited)."""
    if nanos is None:
        return None
    return (Decimal(nanos) / NANO).normalize() if nanos else Decimal(0)


def cost_of(tokens: int, per_million: int) -> int:
    """Cost in nano-credits of ``tokens`` at ``per_million`` nano-credits / 1M, rounded up."""
    return -(-tokens * per_million // 1_000_000)
