"""A request crossing from the event loop to the scheduler thread, and its events coming back.

The scheduler produces events for every running sequence at each step; :class:`Outbox`
hands all of one step's events to each event loop with a single ``call_soon_threadsafe``
(one self-pipe write and one loop wake-up per step instead of one per sequence).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from appliance.engine.protocol import (
    Finish,
    FinishCallback,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
)

__all__ = ["Job", "Outbox"]


class Job:
    """A request crossing from the event loop to the scheduler thread and back."""

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        on_finish: FinishCallback | None = None,
    ) -> None:
        self.request = request
        self.loop = loop
        self.on_finish = on_finish
        self.events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        self.cancelled = False  # set from the loop; read by the scheduler (a plain bool is atomic)
        self.enqueued = time.monotonic()
        # Loop-thread state: on_finish runs once, after the consumer has handled the Finish
        # event, or as soon as both the Finish exists and the consumer is gone.
        self.final: Finish | None = None
        self.consumer_gone = False
        self._delivered = False

    def emit(self, event: GenerationEvent) -> None:
        """Called from the scheduler thread: one event, delivered on its own."""
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.receive, event)

    def receive(self, event: GenerationEvent) -> None:
        """Loop thread: queue an event for the consumer."""
        if isinstance(event, Finish):
            self.final = event
            self.events.put_nowait(event)
            if self.consumer_gone:
                self.deliver()
        else:
            self.events.put_nowait(event)

    def deliver(self) -> None:
        """Run on_finish once (loop thread only)."""
        if self._delivered or self.final is None:
            return
        self._delivered = True
        if self.on_finish is not None:
            self.on_finish(self.final)

    def finish_unstarted(self, reason: FinishReason, message: str = "") -> None:
        """End a job that never reached a slot (cancelled while queued, or shutdown)."""
        self.emit(
            Finish(
                reason=reason,
                prompt_tokens=len(self.request.prompt),
                completion_tokens=0,
                message=message,
            )
        )

    def cancel(self) -> None:
        self.cancelled = True


class Outbox:
    """Scheduler-thread buffer of events, sent to their loops in order by ``flush``."""

    def __init__(self) -> None:
        self._items: list[tuple[Job, GenerationEvent]] = []

    def put(self, job: Job, event: GenerationEvent) -> None:
        self._items.append((job, event))

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, GenerationEvent]]] = {}
        for job, event in items:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
                loop.call_soon_threadsafe(_receive_all, batch)


def _receive_all(batch: list[tuple[Job, GenerationEvent]]) -> None:
    for job, event in batch:
        try:
            job.receive(event)
        except Exception as exc:  # one consumer's failing on_finish must not starve the rest
            job.loop.call_exception_handler(
                {"message": "delivering a generation event failed", "exception": exc}
            )
