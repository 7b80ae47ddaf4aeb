"""Small helpers shared by the API, store, CLI and e2e tests."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from appliance.store.db import Database
from appliance.store.keys import KeyStore, KeySummary

__all__ = ["create_key", "list_keys", "parse_sse", "revoke_key", "wait_for"]

T = TypeVar("T")


def create_key(data_dir: Path, name: str = "test") -> str:
    """Create an API key straight in the database (no server needed); return its plaintext."""

    async def go() -> str:
        db = await Database.open(data_dir)
        try:
            key, _ = await KeyStore(db).create(name)
            return key
        finally:
            await db.close()

    return asyncio.run(go())


def revoke_key(data_dir: Path, name: str) -> None:
    async def go() -> None:
        db = await Database.open(data_dir)
        try:
            await KeyStore(db).revoke(name)
        finally:
            await db.close()

    asyncio.run(go())


def list_keys(data_dir: Path) -> dict[str, KeySummary]:
    async def go() -> list[KeySummary]:
        db = await Database.open(data_dir)
        try:
            return await KeyStore(db).list()
        finally:
            await db.close()

    return {k.name: k for k in asyncio.run(go())}


def wait_for(
    fn: Callable[[], T | None], *, timeout: float = 5.0, interval: float = 0.02, what: str = ""
) -> T:
    """Poll ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or fn}")
        time.sleep(interval)


def parse_sse(lines: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
    """Server-sent event lines -> (decoded JSON data payloads, whether ``[DONE]`` ended it).

    Asserts the framing: only ``data:`` lines and blank separators, nothing after [DONE].
    """
    events: list[dict[str, Any]] = []
    done = False
    for line in lines:
        if not line.strip():
            continue
        assert not done, f"data after [DONE]: {line!r}"
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        events.append(json.loads(payload))
    return events, done
