"""The only module that opens SQLite connections.

Reads use their own connection; every write goes through ``Database.write``: one asyncio
lock, one writer connection, one short ``BEGIN IMMEDIATE`` transaction per call (never held
across generation). WAL lets readers, the CLI and the server work side by side.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from appliance.store.migrations import MIGRATIONS, apply_migrations

__all__ = ["DB_FILENAME", "Database", "Row"]

DB_FILENAME = "appliance.db"
T = TypeVar("T")
Row = sqlite3.Row

# synchronous=FULL: a committed transaction is on disk before COMMIT returns, so usage that
# a client was told about survives a crash or power loss (NORMAL could lose the last commits
# on power loss). See README "Durability".
_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
    "PRAGMA busy_timeout=10000",
)


class Database:
    """An open appliance database; use ``await Database.open(data_dir)``."""

    def __init__(self, path: Path, writer: aiosqlite.Connection, reader: aiosqlite.Connection):
        self.path = path
        self._writer = writer
        self._reader = reader
        self._write_lock = asyncio.Lock()

    @classmethod
    async def open(cls, data_dir: Path) -> Database:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / DB_FILENAME
        writer = await aiosqlite.connect(path, isolation_level=None)
        reader = await aiosqlite.connect(path, isolation_level=None)
        for conn in (writer, reader):
            conn.row_factory = sqlite3.Row
            for pragma in _PRAGMAS:
                await conn.execute(pragma)
        db = cls(path, writer, reader)
        # Only take the write lock when there is something to migrate: opening an up-to-date
        # database (every CLI command does) must not wait for, or starve, the server's writes.
        if await db._migrations_pending():
            await db.write(apply_migrations)
        return db

    async def _migrations_pending(self) -> bool:
        try:
            rows = await self.fetchall("SELECT name FROM _migrations")
        except sqlite3.OperationalError:  # a new database: no _migrations table yet
            return True
        done = {row[0] for row in rows}
        return any(name not in done for name, _ in MIGRATIONS)

    async def write(self, fn: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run ``fn`` inside one IMMEDIATE transaction on the single writer connection."""
        async with self._write_lock:
            conn = self._writer
            await conn.execute("BEGIN IMMEDIATE")
            try:
                result = await fn(conn)
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")
            return result

    async def fetchall(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        async with self._reader.execute(sql, tuple(params)) as cursor:
            return list(await cursor.fetchall())

    async def fetchone(self, sql: str, params: Iterable[Any] = ()) -> Row | None:
        async with self._reader.execute(sql, tuple(params)) as cursor:
            return await cursor.fetchone()

    async def integrity_check(self) -> str:
        row = await self.fetchone("PRAGMA integrity_check")
        return str(row[0]) if row else "no result"

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()
