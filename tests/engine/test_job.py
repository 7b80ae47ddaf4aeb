"""Events of one scheduler step reach their jobs in order, with one loop wake-up per step."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.engine.job import Job, Outbox
from appliance.engine.protocol import Finish, GenerationRequest, TextDelta

pytestmark = pytest.mark.anyio


def _finish(n: int) -> Finish:
    return Finish(reason="stop", prompt_tokens=1, completion_tokens=n)


async def test_outbox_delivers_in_order_with_one_wakeup(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    calls: list[Any] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any) -> Any:
        calls.append(callback)
        return original(callback, *args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
    request = GenerationRequest(prompt=[1], max_tokens=4)
    finished: list[Finish] = []
    a, b = Job(request, loop, finished.append), Job(request, loop)
    outbox = Outbox()
    outbox.put(a, TextDelta(text="x", tokens=1))
    outbox.put(b, TextDelta(text="y", tokens=1))
    outbox.put(a, TextDelta(text="z", tokens=1))
    outbox.put(a, _finish(2))
    await asyncio.to_thread(outbox.flush)  # from another thread, as the scheduler does
    outbox.flush()  # nothing left: no wake-up
    # (to_thread itself wakes the loop once more to return)
    assert [getattr(c, "__name__", "") for c in calls].count("_receive_all") == 1
    got_a = [await a.events.get() for _ in range(3)]
    assert got_a == [TextDelta(text="x", tokens=1), TextDelta(text="z", tokens=1), _finish(2)]
    assert await b.events.get() == TextDelta(text="y", tokens=1)
    assert a.final == _finish(2) and not finished  # on_finish waits for the consumer
    a.deliver()
    assert finished == [_finish(2)]


async def test_a_failing_on_finish_does_not_starve_other_jobs() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:

        def boom(_: Finish) -> None:
            raise RuntimeError("boom")

        request = GenerationRequest(prompt=[1], max_tokens=4)
        gone, other = Job(request, loop, boom), Job(request, loop)
        gone.consumer_gone = True  # on_finish runs on arrival
        outbox = Outbox()
        outbox.put(gone, _finish(1))
        outbox.put(other, TextDelta(text="still here", tokens=1))
        outbox.flush()
        assert await other.events.get() == TextDelta(text="still here", tokens=1)
        assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)
    finally:
        loop.set_exception_handler(None)
