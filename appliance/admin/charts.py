"""A server-rendered SVG bar chart (stacked prompt / completion tokens), no JavaScript.

Colours come from classes styled in ``admin.css``; every bar carries a ``<title>`` (a
tooltip, and what a screen reader announces), and the whole chart has a text summary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

__all__ = ["Bar", "bar_chart", "nice_ceiling", "short_number"]

_W, _H = 720, 240
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 8, 12, 30
_MAX_LABELS = 8


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    """Short axis label, e.g. '14:00' or '03-17'."""
    title: str
    """Full description for the tooltip, e.g. '2025-03-17'."""
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k at least ``value`` (1 for nothing)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return float(step * power)
    return float(10 * power)  # pragma: no cover - the loop always returns


def short_number(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            text = f"{value / scale:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{value:.0f}" if value == int(value) else f"{value:.1f}"


def bar_chart(bars: Sequence[Bar], *, caption: str) -> Markup:
    """An accessible, responsive SVG of ``bars`` (prompt stacked under completion)."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    top = nice_ceiling(max((b.total for b in bars), default=0))
    total = sum(b.total for b in bars)
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H}" role="img" '
        f'aria-label="{escape(caption)}: {total:,} tokens in total" '
        f'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
    ]
    for i in range(5):  # horizontal grid lines and y labels
        value = top * i / 4
        y = _TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_W - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{short_number(value)}</text>"
        )
    if bars:
        slot = plot_w / len(bars)
        width = max(1.0, slot * 0.78)
        every = max(1, math.ceil(len(bars) / _MAX_LABELS))
        for i, bar in enumerate(bars):
            x = _LEFT + slot * i + (slot - width) / 2
            h_p = plot_h * bar.prompt / top
            h_c = plot_h * bar.completion / top
            base = _TOP + plot_h
            tip = (
                f"{bar.title}: {bar.total:,} tokens "
                f"({bar.prompt:,} prompt, {bar.completion:,} completion)"
            )
            parts.append(f"<g><title>{escape(tip)}</title>")
            # A transparent full-height target so thin bars still get the tooltip.
            parts.append(
                f'<rect class="hit" x="{x:.1f}" y="{_TOP}" width="{width:.1f}" height="{plot_h}"/>'
            )
            if h_p > 0:
                parts.append(
                    f'<rect class="bar-prompt" x="{x:.1f}" y="{base - h_p:.1f}" '
                    f'width="{width:.1f}" height="{h_p:.1f}"/>'
                )
            if h_c > 0:
                parts.append(
                    f'<rect class="bar-completion" x="{x:.1f}" y="{base - h_p - h_c:.1f}" '
                    f'width="{width:.1f}" height="{h_c:.1f}"/>'
                )
            parts.append("</g>")
            if i % every == 0:
                parts.append(
                    f'<text class="axis" x="{x + width / 2:.1f}" y="{_H - 10}" '
                    f'text-anchor="middle">{escape(bar.label)}</text>'
                )
    else:
        parts.append(
            f'<text class="axis" x="{_W / 2}" y="{_H / 2}" text-anchor="middle">No usage yet</text>'
        )
    parts.append(
        f'<line class="baseline" x1="{_LEFT}" x2="{_W - _RIGHT}" '
        f'y1="{_TOP + plot_h}" y2="{_TOP + plot_h}"/></svg>'
    )
    return Markup("".join(parts))
