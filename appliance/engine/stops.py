"""Stop strings over a text stream whose pieces may split a stop string anywhere."""

from __future__ import annotations

__all__ = ["StopBuffer"]


class StopBuffer:
    """Releases text that can no longer turn into a stop string; stops before the first match."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit (nothing more once a stop matched)."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self.pending += text
        first = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.stopped = True
            out, self.pending = self.pending[:first], ""
            return out
        hold = 0
        for stop in self.stops:
            # Longest suffix of pending that is a proper prefix of this stop string.
            for n in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:n]):
                    hold = n
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        """End of generation: whatever was held back was not a stop after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
