"""API keys: create, list, revoke, top up, authenticate. Only sha256 hashes are stored."""

from __future__ import annotations

import hmac
import json
import sqlite3
from datetime import UTC, datetime
from decimal import Decimal

import aiosqlite
import msgspec

from appliance.errors import AuthenticationError, InvalidRequestError, NotFoundError
from appliance.store.db import Database, Row
from appliance.store.keyformat import display_prefix, generate_key, hash_key, is_well_formed
from appliance.store.money import MAX_NANOS, format_credits

__all__ = ["ApiKey", "KeyLimits", "KeyStore", "KeySummary", "utcnow"]


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An authenticated key, as request handlers see it."""

    id: int
    name: str
    prefix: str


class KeyLimits(msgspec.Struct, kw_only=True):
    """What the owner sets on a key; None everywhere = no limit."""

    credits: int | None = None
    """Starting balance in nano-credits; None = unlimited (unless starter credits apply)."""
    unlimited: bool = False
    models: list[str] | None = None
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    expires: str | None = None
    """ISO 8601 UTC time after which the key stops working."""
    allowance: int | None = None
    """Nano-credits added once per ``allowance_period`` (the seed's daily bonus)."""
    allowance_period: str | None = None


class KeySummary(msgspec.Struct, kw_only=True):
    """One row of ``keys list``."""

    name: str
    prefix: str
    created: str
    last_used: str | None
    revoked: bool
    revoked_at: str | None
    expires: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    balance: Decimal | None
    """Remaining credits; null = unlimited."""
    reserved: Decimal
    spent: Decimal
    allowed_models: list[str] | None
    rpm: int | None
    tpm: int | None
    concurrency: int | None
    allowance: Decimal | None
    allowance_period: str | None


def _summary(row: Row) -> KeySummary:
    return KeySummary(
        name=row["name"],
        prefix=row["prefix"],
        created=row["created"],
        last_used=row["last_used"],
        revoked=row["revoked"] is not None,
        revoked_at=row["revoked"],
        expires=row["expires"],
        requests=row["requests"],
        prompt_tokens=row["prompt_tokens"],
        completion_tokens=row["completion_tokens"],
        balance=format_credits(row["balance"]),
        reserved=format_credits(row["reserved"]) or Decimal(0),
        spent=format_credits(row["spent"]) or Decimal(0),
        allowed_models=json.loads(row["allowed_models"]) if row["allowed_models"] else None,
        rpm=row["rpm"],
        tpm=row["tpm"],
        concurrency=row["concurrency"],
        allowance=format_credits(row["allowance"]),
        allowance_period=row["allowance_period"],
    )


def _check_limits(limits: KeyLimits) -> None:
    for name in ("rpm", "tpm", "concurrency"):
        value = getattr(limits, name)
        if value is not None and value < 1:
            raise InvalidRequestError(f"{name} must be at least 1", param=name)
    if limits.credits is not None and limits.credits < 0:
        raise InvalidRequestError("credits cannot be negative", param="credits")
    if limits.allowance_period not in (None, "day", "month"):
        raise InvalidRequestError("allowance period must be 'day' or 'month'", param="period")
    if limits.expires is not None:
        try:
            datetime.fromisoformat(limits.expires.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidRequestError(
                f"expires is not a date: {limits.expires!r}", param="expires"
            ) from exc


def normalise_expiry(text: str) -> str:
    """'2027-01-31' or any ISO time -> the UTC ISO string the database compares."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class KeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def create(
        self, name: str, limits: KeyLimits | None = None, *, starter_credits: int | None = None
    ) -> tuple[str, KeySummary]:
        """Create a key; return its plaintext (shown once) and its summary.

        Without ``credits`` and without ``unlimited`` a key is unlimited, unless the owner
        configured starter credits, which it then receives.
        """
        limits = limits or KeyLimits()
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequestError("A key name must be 1 to 100 characters", param="name")
        _check_limits(limits)
        expires = normalise_expiry(limits.expires) if limits.expires else None
        if limits.unlimited and limits.allowance:
            # The ledger would credit the allowance into a balance, silently ending "unlimited".
            raise InvalidRequestError(
                "An unlimited key cannot have an allowance: give it credits instead",
                param="allowance",
            )
        balance = limits.credits
        kind = "topup"
        if balance is None and not limits.unlimited and starter_credits:
            balance, kind = starter_credits, "starter"
        if balance is None and limits.allowance:
            balance = 0  # a key living on its allowance is limited from the start
        key = generate_key()
        created = utcnow()

        async def insert(conn: aiosqlite.Connection) -> None:
            cursor = await conn.execute(
                "INSERT INTO keys (name, prefix, hash, created, expires, allowed_models, rpm, "
                "tpm, concurrency, balance, allowance, allowance_period) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    display_prefix(key),
                    hash_key(key),
                    created,
                    expires,
                    json.dumps(limits.models) if limits.models else None,
                    limits.rpm,
                    limits.tpm,
                    limits.concurrency,
                    balance,
                    limits.allowance,
                    limits.allowance_period if limits.allowance else None,
                ),
            )
            if balance:
                await conn.execute(
                    "INSERT INTO credit_ledger (key_id, kind, amount, created) VALUES (?, ?, ?, ?)",
                    (cursor.lastrowid, kind, balance, created),
                )

        try:
            await self.db.write(insert)
        except sqlite3.IntegrityError as exc:
            raise InvalidRequestError(f"A key named '{name}' already exists", param="name") from exc
        return key, await self.get(name)

    async def get(self, name: str) -> KeySummary:
        row = await self.db.fetchone("SELECT * FROM keys WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"No key named '{name}'", param="name")
        return _summary(row)

    async def list(self) -> list[KeySummary]:
        rows = await self.db.fetchall("SELECT * FROM keys ORDER BY id")
        return [_summary(r) for r in rows]

    async def revoke(self, name: str) -> KeySummary:
        async def update(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "UPDATE keys SET revoked = ? WHERE name = ? AND revoked IS NULL", (utcnow(), name)
            )

        await self.db.write(update)
        return await self.get(name)  # raises NotFoundError for an unknown name

    async def topup(self, name: str, amount: int) -> KeySummary:
        """Add credits (nano-credits, may be negative to correct) through the ledger."""

        async def update(conn: aiosqlite.Connection) -> None:
            async with conn.execute(
                "SELECT id, balance, reserved FROM keys WHERE name = ?", (name,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is None:
                raise NotFoundError(f"No key named '{name}'", param="name")
            if row["balance"] is None:
                raise InvalidRequestError(
                    f"Key '{name}' is unlimited: it has no balance to top up", param="name"
                )
            if row["balance"] + amount < row["reserved"]:
                raise InvalidRequestError("A top-up cannot make a balance negative", param="amount")
            if row["balance"] + amount > MAX_NANOS:
                # SQLite would turn the overflowing INTEGER into an inexact REAL.
                raise InvalidRequestError(
                    "A balance cannot exceed that many credits", param="amount"
                )
            await conn.execute(
                "UPDATE keys SET balance = balance + ? WHERE id = ?", (amount, row["id"])
            )
            await conn.execute(
                "INSERT INTO credit_ledger (key_id, kind, amount, created) "
                "VALUES (?, 'topup', ?, ?)",
                (row["id"], amount, utcnow()),
            )

        await self.db.write(update)
        return await self.get(name)

    async def update_limits(self, name: str, limits: KeyLimits) -> KeySummary:
        """Replace a key's limits (not its balance: that changes only through the ledger)."""
        _check_limits(limits)
        expires = normalise_expiry(limits.expires) if limits.expires else None

        async def update(conn: aiosqlite.Connection) -> int:
            cursor = await conn.execute(
                "UPDATE keys SET allowed_models = ?, rpm = ?, tpm = ?, concurrency = ?, "
                "expires = ?, allowance = ?, allowance_period = ? WHERE name = ?",
                (
                    json.dumps(limits.models) if limits.models else None,
                    limits.rpm,
                    limits.tpm,
                    limits.concurrency,
                    expires,
                    limits.allowance,
                    limits.allowance_period if limits.allowance else None,
                    name,
                ),
            )
            return cursor.rowcount

        if not await self.db.write(update):
            raise NotFoundError(f"No key named '{name}'", param="name")
        return await self.get(name)

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
            "SELECT id, name, prefix, hash, revoked, expires FROM keys WHERE hash = ?", (digest,)
        )
        # compare_digest on the hash keeps the final comparison constant-time.
        if row is None or not hmac.compare_digest(row["hash"], digest):
            raise AuthenticationError("Incorrect API key provided")
        if row["revoked"] is not None:
            raise AuthenticationError("This API key has been revoked")
        if row["expires"] is not None and row["expires"] <= utcnow():
            raise AuthenticationError("This API key has expired")
        return ApiKey(id=row["id"], name=row["name"], prefix=row["prefix"])
