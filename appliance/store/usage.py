"""Usage accounting: every finished generation becomes one usage event plus key totals."""

from __future__ import annotations

import aiosqlite
import msgspec

from appliance.store.db import Database
from appliance.store.keys import utcnow

__all__ = ["UsageRecord", "UsageStore"]


class UsageRecord(msgspec.Struct, kw_only=True):
    key_id: int | None
    model: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    started: str


class UsageStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def record(self, usage: UsageRecord) -> None:
        """Append the event and bump the key's totals in the same transaction."""
        finished = utcnow()

        async def write(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO usage_events (key_id, model, status, prompt_tokens, "
                "completion_tokens, reasoning_tokens, cached_tokens, started, finished) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    usage.key_id,
                    usage.model,
                    usage.status,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.reasoning_tokens,
                    usage.cached_tokens,
                    usage.started,
                    finished,
                ),
            )
            if usage.key_id is not None:
                await conn.execute(
                    "UPDATE keys SET prompt_tokens = prompt_tokens + ?, "
                    "completion_tokens = completion_tokens + ?, requests = requests + 1, "
                    "last_used = ? WHERE id = ?",
                    (usage.prompt_tokens, usage.completion_tokens, finished, usage.key_id),
                )

        await self.db.write(write)
