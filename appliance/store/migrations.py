"""Numbered schema migrations, applied in order and recorded in ``_migrations``.

Add a new ``mNNN_name`` function at the end; never edit one that has shipped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aiosqlite

__all__ = ["MIGRATIONS", "apply_migrations"]

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


async def _run_script(db: aiosqlite.Connection, script: str) -> None:
    # Not executescript(): it COMMITs first, which would split the migration's transaction.
    for statement in script.split(";"):
        if statement.strip():
            await db.execute(statement)


@migration
async def m001_initial(db: aiosqlite.Connection) -> None:
    await _run_script(
        db,
        """
        CREATE TABLE keys (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,            -- shown in lists, e.g. apl_4fTq9Xz2
            hash TEXT NOT NULL UNIQUE,       -- sha256 of the key (never the key itself)
            created TEXT NOT NULL,           -- ISO 8601, UTC
            last_used TEXT,
            revoked TEXT,                    -- when it was revoked, or NULL
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE usage_events (
            id INTEGER PRIMARY KEY,
            key_id INTEGER REFERENCES keys(id),
            model TEXT NOT NULL,
            status TEXT NOT NULL,            -- ok, length, cancelled, error
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            started TEXT NOT NULL,
            finished TEXT NOT NULL
        );
        CREATE INDEX usage_events_key ON usage_events(key_id, finished);
        CREATE TABLE owner_settings (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL              -- JSON
        );
        """,
    )


async def apply_migrations(db: aiosqlite.Connection) -> None:
    """Create the bookkeeping table and run every migration not yet recorded."""
    await db.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied TEXT NOT NULL)"
    )
    async with db.execute("SELECT name FROM _migrations") as cursor:
        done = {row[0] for row in await cursor.fetchall()}
    for name, fn in MIGRATIONS:
        if name not in done:
            await fn(db)
            await db.execute(
                "INSERT INTO _migrations (name, applied) VALUES (?, datetime('now'))", (name,)
            )


@migration
async def m002_billing(db: aiosqlite.Connection) -> None:
    """Credits, limits, reservations and an append-only credit ledger (amounts in nano-credits)."""
    await _run_script(
        db,
        """
        ALTER TABLE keys ADD COLUMN expires TEXT;
        ALTER TABLE keys ADD COLUMN allowed_models TEXT;          -- JSON list, NULL = all
        ALTER TABLE keys ADD COLUMN rpm INTEGER;
        ALTER TABLE keys ADD COLUMN tpm INTEGER;
        ALTER TABLE keys ADD COLUMN concurrency INTEGER;
        ALTER TABLE keys ADD COLUMN balance INTEGER;              -- NULL = unlimited
        ALTER TABLE keys ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE keys ADD COLUMN allowance INTEGER;            -- credited once per period
        ALTER TABLE keys ADD COLUMN allowance_period TEXT;        -- day | month
        ALTER TABLE keys ADD COLUMN allowance_granted TEXT;       -- period last credited
        ALTER TABLE keys ADD COLUMN spent INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_events ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE usage_events ADD COLUMN reservation_id INTEGER;
        CREATE TABLE reservations (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL REFERENCES keys(id),
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            max_tokens INTEGER NOT NULL,
            amount INTEGER NOT NULL,         -- credits held until settlement
            created REAL NOT NULL,           -- unix time (rate windows compare numbers)
            status TEXT NOT NULL             -- pending | settled | voided
        );
        CREATE INDEX reservations_key ON reservations(key_id, created);
        CREATE INDEX reservations_pending ON reservations(status) WHERE status = 'pending';
        CREATE TABLE credit_ledger (
            id INTEGER PRIMARY KEY,
            key_id INTEGER NOT NULL REFERENCES keys(id),
            kind TEXT NOT NULL,              -- starter | topup | allowance | usage
            amount INTEGER NOT NULL,         -- signed nano-credits
            created TEXT NOT NULL,
            usage_event_id INTEGER REFERENCES usage_events(id)
        );
        CREATE INDEX credit_ledger_key ON credit_ledger(key_id);
        CREATE TABLE prices (
            model TEXT PRIMARY KEY,
            input_per_million INTEGER NOT NULL,   -- nano-credits per 1M prompt tokens
            output_per_million INTEGER NOT NULL
        );
        CREATE TABLE token_window (
            key_id INTEGER NOT NULL,
            at REAL NOT NULL,
            tokens INTEGER NOT NULL
        );
        CREATE INDEX token_window_key ON token_window(key_id, at);
        """,
    )
