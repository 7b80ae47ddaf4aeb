"""SQLite store: migrations, hashed keys, revoke/list, usage totals, lock-free opening."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from appliance.errors import AuthenticationError, InvalidRequestError, NotFoundError
from appliance.store.db import DB_FILENAME, Database
from appliance.store.keyformat import hash_key
from appliance.store.keys import KeyStore
from appliance.store.ledger import Ledger, Settlement
from appliance.store.migrations import MIGRATIONS

T = TypeVar("T")


def run(data_dir: Path, fn: Callable[[Database], Awaitable[T]]) -> T:
    """Open the database, run ``fn`` and close it again, in a fresh event loop."""

    async def go() -> T:
        db = await Database.open(data_dir)
        try:
            return await fn(db)
        finally:
            await db.close()

    return asyncio.run(go())


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {r[0] for r in rows}


def all_bytes(data_dir: Path) -> bytes:
    """The database file plus its WAL and shared-memory files, as they are on disk."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.iterdir()) if p.is_file())


# -- migrations ------------------------------------------------------------------------------


def test_open_creates_the_schema_and_records_every_migration(tmp_path: Path) -> None:
    run(tmp_path, lambda db: asyncio.sleep(0))
    path = tmp_path / DB_FILENAME
    assert path.is_file()
    assert {"keys", "usage_events", "owner_settings", "_migrations"} <= tables(path)
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert names == [name for name, _ in MIGRATIONS]
    assert mode == "wal"


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    key = run(tmp_path, lambda db: KeyStore(db).create("alice"))[0]
    path = tmp_path / DB_FILENAME
    with sqlite3.connect(path) as conn:
        schema_before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    for _ in range(3):
        keys = run(tmp_path, lambda db: KeyStore(db).list())
        assert [k.name for k in keys] == ["alice"]
    with sqlite3.connect(path) as conn:
        schema_after = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
        count = conn.execute("SELECT count(*) FROM _migrations").fetchone()[0]
    assert schema_after == schema_before
    assert count == len(MIGRATIONS)
    # The data survived reopening, and the key still authenticates.
    found = run(tmp_path, lambda db: KeyStore(db).authenticate(key))
    assert found.name == "alice"


def test_open_applies_only_pending_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An old database (first migration only) is upgraded in place, keeping its data."""
    import appliance.store.db as db_module
    import appliance.store.migrations as migrations_module

    if len(MIGRATIONS) < 2:
        pytest.skip("needs at least two migrations")
    with monkeypatch.context() as patch:
        patch.setattr(migrations_module, "MIGRATIONS", MIGRATIONS[:1])
        patch.setattr(db_module, "MIGRATIONS", MIGRATIONS[:1])
        insert = "INSERT INTO keys (name, prefix, hash, created) VALUES ('old', 'x', 'h', 'now')"
        run(tmp_path, lambda db: db.write(lambda conn: conn.execute(insert)))
    path = tmp_path / DB_FILENAME
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM _migrations")] == [MIGRATIONS[0][0]]
    run(tmp_path, lambda db: asyncio.sleep(0))
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY rowid")]
        old = conn.execute("SELECT name FROM keys").fetchall()
    assert names == [name for name, _ in MIGRATIONS]
    assert old == [("old",)]
    assert [k.name for k in run(tmp_path, lambda db: KeyStore(db).list())] == ["old"]


def test_opening_an_up_to_date_database_takes_no_write_lock(tmp_path: Path) -> None:
    """The CLI opens the database the server writes to: it must not wait for the writer."""
    run(tmp_path, lambda db: KeyStore(db).create("alice"))
    holder = sqlite3.connect(tmp_path / DB_FILENAME, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # like a server write in progress
        holder.execute("UPDATE keys SET last_used = 'now'")
        started = time.monotonic()
        keys = run(tmp_path, lambda db: KeyStore(db).list())
        assert time.monotonic() - started < 2.0
        assert [k.name for k in keys] == ["alice"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()


# -- keys ------------------------------------------------------------------------------------


def test_keys_are_stored_hashed_only(tmp_path: Path) -> None:
    created = [run(tmp_path, lambda db, n=n: KeyStore(db).create(n)) for n in ("a", "b", "c")]
    data = all_bytes(tmp_path)
    for key, summary in created:
        assert key.encode() not in data
        assert key[len(summary.prefix) :].encode() not in data  # not even the secret part
        assert key.startswith(summary.prefix)
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        rows = dict(conn.execute("SELECT name, hash FROM keys").fetchall())
    assert rows == {s.name: hash_key(k) for k, s in created}


def test_create_list_and_summary_fields(tmp_path: Path) -> None:
    key, summary = run(tmp_path, lambda db: KeyStore(db).create("alice"))
    assert summary.name == "alice"
    assert key.startswith(summary.prefix) and len(summary.prefix) >= 8
    assert summary.created.endswith("Z")
    assert summary.revoked is False and summary.revoked_at is None
    assert (summary.requests, summary.prompt_tokens, summary.completion_tokens) == (0, 0, 0)
    assert summary.balance is None  # unlimited
    run(tmp_path, lambda db: KeyStore(db).create("bob"))
    keys = run(tmp_path, lambda db: KeyStore(db).list())
    assert [k.name for k in keys] == ["alice", "bob"]
    assert run(tmp_path, lambda db: KeyStore(db).count()) == 2


@pytest.mark.parametrize("name", ["", "   ", "x" * 101])
def test_bad_key_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequestError):
        run(tmp_path, lambda db: KeyStore(db).create(name))


def test_duplicate_key_name(tmp_path: Path) -> None:
    run(tmp_path, lambda db: KeyStore(db).create("alice"))
    with pytest.raises(InvalidRequestError, match="already exists"):
        run(tmp_path, lambda db: KeyStore(db).create("alice"))


def test_revoke(tmp_path: Path) -> None:
    key, _ = run(tmp_path, lambda db: KeyStore(db).create("alice"))
    other, _ = run(tmp_path, lambda db: KeyStore(db).create("bob"))
    summary = run(tmp_path, lambda db: KeyStore(db).revoke("alice"))
    assert summary.revoked is True and summary.revoked_at is not None
    with pytest.raises(AuthenticationError, match="revoked"):
        run(tmp_path, lambda db: KeyStore(db).authenticate(key))
    assert run(tmp_path, lambda db: KeyStore(db).authenticate(other)).name == "bob"
    listed = {k.name: k.revoked for k in run(tmp_path, lambda db: KeyStore(db).list())}
    assert listed == {"alice": True, "bob": False}


def test_revoke_unknown_key(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        run(tmp_path, lambda db: KeyStore(db).revoke("nobody"))


def test_authenticate(tmp_path: Path) -> None:
    key, summary = run(tmp_path, lambda db: KeyStore(db).create("alice"))
    found = run(tmp_path, lambda db: KeyStore(db).authenticate(key))
    assert (found.name, found.prefix) == ("alice", summary.prefix)
    for bad in (None, "", key[:-1] + ("x" if key[-1] != "x" else "y")):
        with pytest.raises(AuthenticationError):
            run(tmp_path, lambda db, bad=bad: KeyStore(db).authenticate(bad))


# -- usage -----------------------------------------------------------------------------------


def test_usage_totals_accumulate_per_key(tmp_path: Path) -> None:
    key, _ = run(tmp_path, lambda db: KeyStore(db).create("alice"))
    run(tmp_path, lambda db: KeyStore(db).create("bob"))

    async def bill(db: Database, prompt: int, completion: int, status: str) -> None:
        found = await KeyStore(db).authenticate(key)
        ledger = Ledger(db)
        ticket = await ledger.reserve(found, "m", prompt, completion + 10)
        await ledger.settle(
            ticket,
            Settlement(
                status=status,
                prompt_tokens=prompt,
                completion_tokens=completion,
                started="2026-01-01T00:00:00.000Z",
            ),
        )

    run(tmp_path, lambda db: bill(db, 10, 5, "stop"))
    run(tmp_path, lambda db: bill(db, 7, 3, "length"))
    run(tmp_path, lambda db: bill(db, 4, 2, "cancelled"))
    keys = {k.name: k for k in run(tmp_path, lambda db: KeyStore(db).list())}
    alice, bob = keys["alice"], keys["bob"]
    assert (alice.requests, alice.prompt_tokens, alice.completion_tokens) == (3, 21, 10)
    assert alice.last_used is not None
    assert (bob.requests, bob.prompt_tokens, bob.completion_tokens) == (0, 0, 0)
    with sqlite3.connect(tmp_path / DB_FILENAME) as conn:
        events = conn.execute(
            "SELECT status, prompt_tokens, completion_tokens FROM usage_events ORDER BY id"
        ).fetchall()
    assert events == [("stop", 10, 5), ("length", 7, 3), ("cancelled", 4, 2)]
