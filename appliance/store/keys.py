"""API keys: create, list, revoke, authenticate. Only sha256 hashes are stored."""

from __future__ import annotations

import hmac
import sqlite3
from datetime import UTC, datetime

import aiosqlite
import msgspec

from appliance.errors import AuthenticationError, InvalidRequestError, NotFoundError
from appliance.store.db import Database, Row
from appliance.store.keyformat import display_prefix, generate_key, hash_key, is_well_formed

__all__ = ["ApiKey", "KeyStore", "KeySummary", "utcnow"]


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated key, as request handlers see it."""

    id: int
    name: str
    prefix: str


class KeySummary(msgspec.Struct, kw_only=True):
    """One row of ``keys list``."""

    name: str
    prefix: str
    created: str
    last_used: str | None
    revoked: bool
    revoked_at: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    balance: str | None = None
    """Remaining credits as a decimal string; null = unlimited."""


def _summary(row: Row) -> KeySummary:
    return KeySummary(
        name=row["name"],
        prefix=row["prefix"],
        created=row["created"],
        last_used=row["last_used"],
        revoked=row["revoked"] is not None,
        revoked_at=row["revoked"],
        requests=row["requests"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
    )


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(self, name: str) -> tuple[str, KeySummary]:
        """Create a key; return its plaintext (shown once) and its summary."""
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequestError("A key name must be 1 to 100 characters", param="name")
        key = generate_key()
        created = utcnow()

        async def insert(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO keys (name, prefix, hash, created) VALUES (?, ?, ?, ?)",
                (name, display_prefix(key), hash_key(key), created),
            )

        try:
            await self.db.write(insert)
        except sqlite3.IntegrityError as exc:
            raise InvalidRequestError(f"A key named '{name}' already exists", param="name") from exc
        summary = await self.get(name)
        return key, summary

    async def get(self, name: str) -> KeySummary:
        row = await self.db.fetchone("SELECT * FROM keys WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"No key named '{name}'", param="name")
        return _summary(row)

    async def list(self) -> list[KeySummary]:
        rows = await self.db.fetchall("SELECT * FROM keys ORDER BY id")
        return [_summary(r) for r in rows]

    async def revoke(self, name: str) -> KeySummary:
        async def update(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (utcnow(), name)
            )
            return cursor.rowcount

        changed = await self.db.write(update)
        summary = await self.get(name)  # raises NotFoundError for an unknown name
        if not changed and not summary.revoked:
            raise NotFoundError(f"No key named '{name}'", param="name")
        return summary

    async def count(self) -> int:
        row = await self.db.fetchone("SELECT count(*) FROM keys")
        return int(row[0]) if row else 0

    async def authenticate(self, presented: str | None) -> ApiKey:
        """Resolve a bearer key; malformed keys are refused before touching the database."""
        if not presented:
            raise AuthenticationError(
                "Missing API key: send 'Authorization: Bearer <key>'. "
                "Create one with 'appliance keys create NAME'."
            )
        if not is_well_formed(presented):
            raise AuthenticationError("Incorrect API key provided")
        digest = hash_key(presented)
        row = await self.db.fetchone(
            "SELECT id, name, prefix, hash, revoked FROM keys WHERE hash = ?", (digest,)
        )
        # compare_digest on the hash keeps the final comparison constant-time.
        if row is None or not hmac.compare_digest(row["hash"], digest):
            raise AuthenticationError("Incorrect API key provided")
        if row["revoked"] is not None:
            raise AuthenticationError("This API key has been revoked")
        return ApiKey(id=row["id"], name=row["name"], prefix=row["prefix"])
