"""Credits and limits that stay exact under concurrency and crashes.

Every request is admitted by ``reserve``: one ``BEGIN IMMEDIATE`` transaction that checks the
key's limits (concurrency, requests and tokens per minute, allowed models, expiry), grants a
due periodic allowance, and holds ``(prompt + max output) x price`` against the balance. When
generation ends, ``settle`` bills the real usage and releases the rest; ``void`` releases a
reservation that never ran; ``recover`` voids what a crash left pending. No transaction is
held while generating. Amounts are nano-credits (see ``money``).
"""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime

import aiosqlite
import msgspec

from appliance.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    PermissionDeniedError,
    RateLimitError,
)
from appliance.store.db import Database
from appliance.store.keys import ApiKey, utcnow
from appliance.store.money import cost_of, format_credits

__all__ = ["DEFAULT_PRICES", "Ledger", "Price", "Settlement", "Ticket"]


class Price(msgspec.Struct, frozen=True):
    """Nano-credits per one million prompt / completion tokens."""

    input_per_million: int
    output_per_million: int


# The seed's prices: 0.30 credits per 1M input tokens, 0.90 per 1M output tokens.
DEFAULT_PRICES = Price(300_000_000, 900_000_000)
_WINDOW = 60.0


class Ticket(msgspec.Struct, frozen=True, kw_only=True):
    """A pending reservation, settled or voided exactly once."""

    id: int
    key_id: int
    model: str
    amount: int
    price: Price


class Settlement(msgspec.Struct, kw_only=True):
    status: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    started: str


def _period(kind: str, now: datetime) -> str:
    return now.strftime("%Y-%m") if kind == "month" else now.strftime("%Y-%m-%d")


def _retry_after(oldest: float | None, now: float) -> int:
    if oldest is None:
        return 1
    return max(1, math.ceil(oldest + _WINDOW - now))


async def _one(conn: aiosqlite.Connection, sql: str, params: tuple[object, ...]) -> aiosqlite.Row:
    async with conn.execute(sql, params) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return row


class Ledger:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- prices ----------------------------------------------------------------------------
    async def price(self, model: str) -> Price:
        row = await self.db.fetchone(
            "SELECT input_per_million, output_per_million FROM prices WHERE model = ?", (model,)
        )
        if row is None:
            row = await self.db.fetchone(
                "SELECT input_per_million, output_per_million FROM prices WHERE model = '*'"
            )
        return DEFAULT_PRICES if row is None else Price(row[0], row[1])

    async def set_price(self, model: str, price: Price) -> None:
        async def write(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO prices (model, input_per_million, output_per_million) "
                "VALUES (?, ?, ?) ON CONFLICT(model) DO UPDATE SET "
                "input_per_million = excluded.input_per_million, "
                "output_per_million = excluded.output_per_million",
                (model, price.input_per_million, price.output_per_million),
            )

        await self.db.write(write)

    async def prices(self) -> dict[str, Price]:
        rows = await self.db.fetchall("SELECT * FROM prices ORDER BY model")
        return {r["model"]: Price(r["input_per_million"], r["output_per_million"]) for r in rows}

    # -- admission -------------------------------------------------------------------------
    async def reserve(self, key: ApiKey, model: str, prompt_tokens: int, max_tokens: int) -> Ticket:
        price = await self.price(model)
        amount = cost_of(prompt_tokens, price.input_per_million) + cost_of(
            max_tokens, price.output_per_million
        )

        async def admit(conn: aiosqlite.Connection) -> Ticket:
            now = time.time()
            row = await _one(conn, "SELECT * FROM keys WHERE id = ?", (key.id,))
            if row["revoked"] is not None:
                raise AuthenticationError("This API key has been revoked")
            if row["expires"] is not None and row["expires"] <= utcnow():
                raise AuthenticationError("This API key has expired")
            if row["allowed_models"] is not None and model not in json.loads(row["allowed_models"]):
                raise PermissionDeniedError(
                    f"This API key may not use the model '{model}'", param="model"
                )
            await self._grant_allowance(conn, row)
            await self._check_rates(conn, row, prompt_tokens, now)
            balance = await _one(conn, "SELECT balance, reserved FROM keys WHERE id = ?", (key.id,))
            if balance["balance"] is not None and amount > balance["balance"] - balance["reserved"]:
                available = format_credits(balance["balance"] - balance["reserved"])
                raise InsufficientQuotaError(
                    f"This key's credits ({available}) cannot cover this request "
                    f"(up to {format_credits(amount)} credits for {prompt_tokens} prompt and "
                    f"{max_tokens} completion tokens). Lower max_tokens or top up the key."
                )
            await conn.execute(
                "UPDATE keys SET reserved = reserved + ? WHERE id = ?", (amount, key.id)
            )
            cursor = await conn.execute(
                "INSERT INTO reservations (key_id, model, prompt_tokens, max_tokens, amount, "
                "created, status) VALUES (?, ?, ?, ?, ?, ?, 'pending')",
                (key.id, model, prompt_tokens, max_tokens, amount, now),
            )
            await conn.execute(
                "INSERT INTO token_window (key_id, at, tokens) VALUES (?, ?, ?)",
                (key.id, now, prompt_tokens),
            )
            assert cursor.lastrowid is not None
            return Ticket(
                id=cursor.lastrowid, key_id=key.id, model=model, amount=amount, price=price
            )

        return await self.db.write(admit)

    async def _grant_allowance(self, conn: aiosqlite.Connection, row: aiosqlite.Row) -> None:
        """Credit the periodic allowance lazily, on the first request of a new period."""
        if not row["allowance"] or not row["allowance_period"]:
            return
        period = _period(row["allowance_period"], datetime.now(UTC))
        if row["allowance_granted"] == period:
            return
        await conn.execute(
            "UPDATE keys SET balance = COALESCE(balance, 0) + ?, allowance_granted = ? "
            "WHERE id = ?",
            (row["allowance"], period, row["id"]),
        )
        await conn.execute(
            "INSERT INTO credit_ledger (key_id, kind, amount, created) "
            "VALUES (?, 'allowance', ?, ?)",
            (row["id"], row["allowance"], utcnow()),
        )

    async def _check_rates(
        self, conn: aiosqlite.Connection, row: aiosqlite.Row, prompt_tokens: int, now: float
    ) -> None:
        key_id = row["id"]
        if row["concurrency"] is not None:
            # "+key_id" steers SQLite to the partial index of pending rows; the (key_id,
            # created) index would visit every reservation the key ever made.
            running = await _one(
                conn,
                "SELECT count(*) FROM reservations WHERE +key_id = ? AND status = 'pending'",
                (key_id,),
            )
            if running[0] >= row["concurrency"]:
                raise RateLimitError(
                    f"Too many concurrent requests for this key (limit {row['concurrency']})",
                    retry_after=1,
                )
        if row["rpm"] is not None:
            recent = await _one(
                conn,
                "SELECT count(*), min(created) FROM reservations WHERE key_id = ? AND created > ?",
                (key_id, now - _WINDOW),
            )
            if recent[0] >= row["rpm"]:
                raise RateLimitError(
                    f"Rate limit reached: {row['rpm']} requests per minute for this key",
                    retry_after=_retry_after(recent[1], now),
                )
        if row["tpm"] is not None:
            used = await _one(
                conn,
                "SELECT COALESCE(sum(tokens), 0), min(at) FROM token_window "
                "WHERE key_id = ? AND at > ?",
                (key_id, now - _WINDOW),
            )
            if used[0] and used[0] + prompt_tokens > row["tpm"]:
                raise RateLimitError(
                    f"Rate limit reached: {row['tpm']} tokens per minute for this key "
                    f"({used[0]} used in the last minute)",
                    retry_after=_retry_after(used[1], now),
                )

    # -- settlement ------------------------------------------------------------------------
    async def settle(self, ticket: Ticket, usage: Settlement) -> int | None:
        """Bill the real usage and release the reservation; None if it was already resolved."""
        cost = cost_of(usage.prompt_tokens, ticket.price.input_per_million) + cost_of(
            usage.completion_tokens, ticket.price.output_per_million
        )
        # Never bill more than was reserved (completion <= max_tokens makes this hold anyway).
        cost = min(cost, ticket.amount)

        async def write(conn: aiosqlite.Connection) -> int | None:
            cursor = await conn.execute(
                "UPDATE reservations SET status = 'settled' WHERE id = ? AND status = 'pending'",
                (ticket.id,),
            )
            if cursor.rowcount == 0:
                return None
            finished = utcnow()
            cursor = await conn.execute(
                "INSERT INTO usage_events (key_id, model, status, prompt_tokens, "
                "completion_tokens, reasoning_tokens, cached_tokens, started, finished, cost, "
                "reservation_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ticket.key_id,
                    ticket.model,
                    usage.status,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.reasoning_tokens,
                    usage.cached_tokens,
                    usage.started,
                    finished,
                    cost,
                    ticket.id,
                ),
            )
            event_id = cursor.lastrowid
            await conn.execute(
                "UPDATE keys SET reserved = reserved - ?, "
                "balance = CASE WHEN balance IS NULL THEN NULL ELSE balance - ? END, "
                "spent = spent + ?, prompt_tokens = prompt_tokens + ?, "
                "completion_tokens = completion_tokens + ?, requests = requests + 1, "
                "last_used = ? WHERE id = ?",
                (
                    ticket.amount,
                    cost,
                    cost,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    finished,
                    ticket.key_id,
                ),
            )
            limited = await _one(
                conn, "SELECT balance IS NOT NULL FROM keys WHERE id = ?", (ticket.key_id,)
            )
            if limited[0]:
                await conn.execute(
                    "INSERT INTO credit_ledger (key_id, kind, amount, created, usage_event_id) "
                    "VALUES (?, 'usage', ?, ?, ?)",
                    (ticket.key_id, -cost, finished, event_id),
                )
            now = time.time()
            if usage.completion_tokens:
                await conn.execute(
                    "INSERT INTO token_window (key_id, at, tokens) VALUES (?, ?, ?)",
                    (ticket.key_id, now, usage.completion_tokens),
                )
            await conn.execute("DELETE FROM token_window WHERE at < ?", (now - 2 * _WINDOW,))
            return cost

        return await self.db.write(write)

    async def void(self, ticket: Ticket) -> None:
        """Release a reservation whose request never generated anything."""

        async def write(conn: aiosqlite.Connection) -> None:
            await self._void(conn, ticket.id, ticket.key_id, ticket.amount)

        await self.db.write(write)

    @staticmethod
    async def _void(conn: aiosqlite.Connection, rid: int, key_id: int, amount: int) -> None:
        cursor = await conn.execute(
            "UPDATE reservations SET status = 'voided' WHERE id = ? AND status = 'pending'",
            (rid,),
        )
        if cursor.rowcount:
            await conn.execute(
                "UPDATE keys SET reserved = reserved - ? WHERE id = ?", (amount, key_id)
            )

    async def recover(self) -> int:
        """At start-up: void reservations a crash left pending (their streams died with it)."""

        async def write(conn: aiosqlite.Connection) -> int:
            async with conn.execute(
                "SELECT id, key_id, amount FROM reservations WHERE status = 'pending'"
            ) as cursor:
                pending = list(await cursor.fetchall())
            for row in pending:
                await self._void(conn, row[0], row[1], row[2])
            return len(pending)

        return await self.db.write(write)

    async def check_consistency(self) -> list[str]:
        """Invariants a test or the admin can check; empty when all hold."""
        problems = []
        rows = await self.db.fetchall(
            "SELECT k.name, k.balance, k.reserved, "
            "(SELECT COALESCE(sum(amount), 0) FROM credit_ledger c WHERE c.key_id = k.id) AS led, "
            "(SELECT COALESCE(sum(amount), 0) FROM reservations r "
            " WHERE r.key_id = k.id AND r.status = 'pending') AS held "
            "FROM keys k"
        )
        for r in rows:
            if r["balance"] is not None and r["balance"] != r["led"]:
                problems.append(f"{r['name']}: balance {r['balance']} != ledger sum {r['led']}")
            if r["balance"] is not None and r["balance"] < 0:
                problems.append(f"{r['name']}: negative balance {r['balance']}")
            if r["reserved"] != r["held"]:
                problems.append(f"{r['name']}: reserved {r['reserved']} != pending {r['held']}")
        return problems
