"""Credits ledger on a real SQLite file (no engine): money arithmetic, reserve/settle/void,
limits, allowances, starter credits, top-ups, crash recovery and the admission race."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import appliance.store.ledger as ledger_mod
from appliance.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from appliance.store.db import Database
from appliance.store.keys import ApiKey, KeyLimits, KeyStore
from appliance.store.ledger import DEFAULT_PRICES, Ledger, Price, Settlement, Ticket
from appliance.store.money import MAX_NANOS, NANO, cost_of, format_credits, parse_credits

IN_NANOS = 300  # 0.30 credits per 1M prompt tokens = 300 nano-credits per token
OUT_NANOS = 900  # 0.90 credits per 1M completion tokens
MODEL = "m"


def expected_cost(prompt: int, completion: int) -> int:
    return prompt * IN_NANOS + completion * OUT_NANOS


def usage(prompt: int, completion: int, status: str = "stop") -> Settlement:
    return Settlement(
        status=status,
        prompt_tokens=prompt,
        completion_tokens=completion,
        started="2030-01-01T00:00:00.000Z",
    )


# -- money -------------------------------------------------------------------------------------


def test_default_prices_are_the_seed_prices() -> None:
    assert Price(parse_credits("0.30"), parse_credits("0.90")) == DEFAULT_PRICES
    assert cost_of(1_000_000, DEFAULT_PRICES.input_per_million) == parse_credits("0.3")
    assert cost_of(1, DEFAULT_PRICES.output_per_million) == OUT_NANOS


def test_parse_and_format_credits_are_exact() -> None:
    assert parse_credits("0.1") + parse_credits("0.2") == parse_credits("0.3")
    assert format_credits(parse_credits("0.1") + parse_credits("0.2")) == Decimal("0.3")
    assert parse_credits("1.5") == 1_500_000_000
    assert parse_credits("0.000000001") == 1
    assert parse_credits("1.000000000") == NANO  # trailing zeros are not extra precision
    assert parse_credits("-2.5") == -2_500_000_000
    assert parse_credits(3) == 3 * NANO
    assert parse_credits(Decimal("0.25")) == NANO // 4
    assert parse_credits(0.1) == parse_credits("0.1")
    assert parse_credits("1E+2") == 100 * NANO
    assert parse_credits("0") == 0
    assert format_credits(None) is None
    assert format_credits(0) == 0
    assert format_credits(1) == Decimal("0.000000001")
    assert format_credits(1_500_000_000) == Decimal("1.5")
    # Whole numbers print plainly (normalize() alone would give '1E+2').
    assert str(format_credits(100 * NANO)) == "100"
    assert str(format_credits(-10 * NANO)) == "-10"
    assert str(format_credits(1230 * NANO)) == "1230"
    assert str(format_credits(26_400)) == "0.0000264"
    total = sum(parse_credits("0.1") for _ in range(10))
    assert total == parse_credits("1") and format_credits(total) == 1


@pytest.mark.parametrize(
    "text",
    [
        "0.0000000001",
        "1.0000000001",
        "1.000000000000000000000000000001",  # beyond Decimal's 28-digit context
        "1e-10",
        "1e-999999999",
        "NaN",
        "nan",
        "sNaN",
        "inf",
        "-Infinity",
        "abc",
        "",
        "1.2.3",
        "1e20",  # beyond SQLite's 64-bit INTEGER
        "9223372036.854775808",
        "1e999999999",
    ],
)
def test_parse_credits_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_credits(text)


def test_parse_credits_accepts_the_largest_storable_amount() -> None:
    assert parse_credits("9223372036.854775807") == MAX_NANOS


@given(st.integers(-MAX_NANOS, MAX_NANOS))
def test_format_then_parse_round_trips(nanos: int) -> None:
    formatted = format_credits(nanos)
    assert formatted is not None
    assert parse_credits(str(formatted)) == nanos
    assert formatted * NANO == nanos


@given(st.integers(0, 10**7), st.integers(0, 10**12))
def test_cost_of_rounds_up_to_the_next_nano_credit(tokens: int, per_million: int) -> None:
    cost = cost_of(tokens, per_million)
    assert cost * 1_000_000 >= tokens * per_million
    assert (cost - 1) * 1_000_000 < tokens * per_million or cost == 0


def test_cost_of_examples() -> None:
    assert cost_of(0, 900_000_000) == 0
    assert cost_of(1, 1) == 1  # a millionth of a nano-credit still costs one
    assert cost_of(1_000_000, 1) == 1
    assert cost_of(1_000_001, 1) == 2
    assert cost_of(3, 333_333) == 1
    assert cost_of(7, 300_000_000) == 2100


# -- fixtures ----------------------------------------------------------------------------------


@dataclass
class Env:
    db: Database
    keys: KeyStore
    ledger: Ledger
    path: Path

    async def key(
        self, name: str, limits: KeyLimits | None = None, **kw: Any
    ) -> tuple[str, ApiKey]:
        plaintext, _ = await self.keys.create(name, limits, **kw)
        return plaintext, await self.keys.authenticate(plaintext)

    async def row(self, name: str) -> sqlite3.Row:
        row = await self.db.fetchone("SELECT * FROM keys WHERE name = ?", (name,))
        assert row is not None
        return row

    async def ledger_rows(self, name: str) -> list[tuple[str, int]]:
        rows = await self.db.fetchall(
            "SELECT kind, amount FROM credit_ledger c JOIN keys k ON k.id = c.key_id "
            "WHERE k.name = ? ORDER BY c.id",
            (name,),
        )
        return [(r[0], r[1]) for r in rows]

    async def events(self, name: str) -> list[sqlite3.Row]:
        return await self.db.fetchall(
            "SELECT u.* FROM usage_events u JOIN keys k ON k.id = u.key_id WHERE k.name = ? "
            "ORDER BY u.id",
            (name,),
        )

    async def pending(self) -> int:
        row = await self.db.fetchone("SELECT count(*) FROM reservations WHERE status = 'pending'")
        assert row is not None
        return int(row[0])


async def assert_consistent(env: Env) -> None:
    assert await env.ledger.check_consistency() == []
    rows = await env.db.fetchall(
        "SELECT k.name, k.balance, k.spent, "
        "(SELECT COALESCE(sum(cost), 0) FROM usage_events u WHERE u.key_id = k.id) AS billed "
        "FROM keys k"
    )
    for r in rows:
        assert r["balance"] is None or r["balance"] >= 0, r["name"]
        assert r["spent"] == r["billed"], r["name"]


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    db = await Database.open(tmp_path)
    environment = Env(db, KeyStore(db), Ledger(db), tmp_path)
    yield environment
    await assert_consistent(environment)  # every scenario leaves the books balanced
    await environment.db.close()


# -- reserve / settle / void -------------------------------------------------------------------


@pytest.mark.anyio
async def test_settle_bills_exactly_the_real_usage_and_releases_the_rest(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    assert await env.ledger_rows("alice") == [("topup", NANO)]
    ticket = await env.ledger.reserve(key, MODEL, 1000, 500)
    assert ticket.amount == expected_cost(1000, 500) == 750_000
    assert ticket.price == DEFAULT_PRICES
    row = await env.row("alice")
    assert (row["balance"], row["reserved"]) == (NANO, 750_000)
    assert (await env.keys.get("alice")).reserved == Decimal("0.00075")
    await assert_consistent(env)

    cost = await env.ledger.settle(ticket, usage(1000, 123))
    assert cost == expected_cost(1000, 123) == 410_700
    row = await env.row("alice")
    assert row["balance"] == NANO - 410_700
    assert row["reserved"] == 0
    assert row["spent"] == 410_700
    assert (row["prompt_tokens"], row["completion_tokens"], row["requests"]) == (1000, 123, 1)
    assert row["last_used"] is not None
    assert await env.ledger_rows("alice") == [("topup", NANO), ("usage", -410_700)]
    (event,) = await env.events("alice")
    assert (event["prompt_tokens"], event["completion_tokens"], event["cost"]) == (1000, 123, cost)
    assert (event["status"], event["model"], event["reservation_id"]) == ("stop", MODEL, ticket.id)
    summary = await env.keys.get("alice")
    assert summary.balance == Decimal(1) - Decimal("0.0004107")
    assert summary.spent == Decimal("0.0004107")


@pytest.mark.anyio
async def test_prices_per_model_and_default(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    await env.ledger.set_price("big", Price(parse_credits("2"), parse_credits("6")))
    ticket = await env.ledger.reserve(key, "big", 10, 10)
    assert ticket.amount == 10 * 2000 + 10 * 6000
    assert await env.ledger.settle(ticket, usage(10, 5)) == 10 * 2000 + 5 * 6000
    await env.ledger.set_price("*", Price(1_000_000, 1_000_000))  # 1 nano per token
    ticket = await env.ledger.reserve(key, "other", 10, 10)
    assert ticket.amount == 20
    await env.ledger.void(ticket)


@pytest.mark.anyio
async def test_settle_never_bills_more_than_was_reserved(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    ticket = await env.ledger.reserve(key, MODEL, 10, 10)
    assert await env.ledger.settle(ticket, usage(10, 50)) == ticket.amount


@pytest.mark.anyio
async def test_void_releases_everything(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    ticket = await env.ledger.reserve(key, MODEL, 100, 100)
    await env.ledger.void(ticket)
    row = await env.row("alice")
    assert (row["balance"], row["reserved"], row["spent"], row["requests"]) == (NANO, 0, 0, 0)
    assert await env.events("alice") == []
    assert await env.ledger_rows("alice") == [("topup", NANO)]
    # Resolved once: neither a second void nor a late settle changes anything.
    await env.ledger.void(ticket)
    assert await env.ledger.settle(ticket, usage(100, 10)) is None
    row = await env.row("alice")
    assert (row["balance"], row["reserved"], row["requests"]) == (NANO, 0, 0)


@pytest.mark.anyio
async def test_settle_twice_is_a_no_op(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    ticket = await env.ledger.reserve(key, MODEL, 100, 100)
    first = await env.ledger.settle(ticket, usage(100, 40))
    assert first == expected_cost(100, 40)
    assert await env.ledger.settle(ticket, usage(100, 40)) is None
    assert await env.ledger.settle(ticket, usage(100, 99)) is None
    await env.ledger.void(ticket)
    row = await env.row("alice")
    assert (row["balance"], row["reserved"], row["requests"]) == (NANO - first, 0, 1)
    assert len(await env.events("alice")) == 1
    assert len(await env.ledger_rows("alice")) == 2


@pytest.mark.anyio
async def test_unlimited_key_tracks_spend_without_a_balance(env: Env) -> None:
    _, key = await env.key("free", KeyLimits(unlimited=True))
    tickets = [await env.ledger.reserve(key, MODEL, 10**6, 10**6) for _ in range(3)]
    for t in tickets:
        await env.ledger.settle(t, usage(10**6, 1000))
    row = await env.row("free")
    assert row["balance"] is None
    assert row["spent"] == 3 * expected_cost(10**6, 1000)
    assert row["reserved"] == 0
    assert await env.ledger_rows("free") == []  # no balance, so no ledger movements
    assert (await env.keys.get("free")).balance is None


# -- admission limits --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_insufficient_quota_when_the_hold_cannot_be_covered(env: Env) -> None:
    need = expected_cost(200, 300)
    _, poor = await env.key("poor", KeyLimits(credits=need - 1))
    with pytest.raises(InsufficientQuotaError) as info:
        await env.ledger.reserve(poor, MODEL, 200, 300)
    assert info.value.status_code == 429
    assert info.value.code == "insufficient_quota"
    assert info.value.error_type == "insufficient_quota"
    assert await env.pending() == 0
    # Lower max_tokens and it fits.
    ticket = await env.ledger.reserve(poor, MODEL, 200, 299)
    await env.ledger.void(ticket)

    _, exact = await env.key("exact", KeyLimits(credits=need))
    ticket = await env.ledger.reserve(exact, MODEL, 200, 300)
    # The hold counts: nothing is left for a second request, even a tiny one.
    with pytest.raises(InsufficientQuotaError):
        await env.ledger.reserve(exact, MODEL, 1, 1)
    await env.ledger.settle(ticket, usage(200, 300))
    assert (await env.row("exact"))["balance"] == 0
    with pytest.raises(InsufficientQuotaError):
        await env.ledger.reserve(exact, MODEL, 1, 0)
    ticket = await env.ledger.reserve(exact, MODEL, 0, 0)  # costs nothing: admitted
    await env.ledger.settle(ticket, usage(0, 0))

    _, empty = await env.key("empty", KeyLimits(credits=0))
    with pytest.raises(InsufficientQuotaError):
        await env.ledger.reserve(empty, MODEL, 1, 1)


@pytest.mark.anyio
async def test_rpm_limit_with_retry_after(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(ledger_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    _, key = await env.key("slow", KeyLimits(rpm=2))
    first = await env.ledger.reserve(key, MODEL, 5, 5)
    clock[0] += 10
    second = await env.ledger.reserve(key, MODEL, 5, 5)
    await env.ledger.settle(first, usage(5, 5))
    await env.ledger.void(second)  # released requests still count against the rate
    clock[0] += 5
    with pytest.raises(RateLimitError) as info:
        await env.ledger.reserve(key, MODEL, 5, 5)
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.retry_after == 45  # the first request leaves the window in 45 s
    assert info.value.headers() == {"Retry-After": "45"}
    clock[0] += 46
    third = await env.ledger.reserve(key, MODEL, 5, 5)
    with pytest.raises(RateLimitError) as info:
        await env.ledger.reserve(key, MODEL, 5, 5)
    assert info.value.retry_after == 9
    await env.ledger.void(third)


@pytest.mark.anyio
async def test_tpm_limit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [2_000_000.0]
    monkeypatch.setattr(ledger_mod, "time", SimpleNamespace(time=lambda: clock[0]))
    _, key = await env.key("tok", KeyLimits(tpm=1000))
    first = await env.ledger.reserve(key, MODEL, 600, 100)
    with pytest.raises(RateLimitError) as info:
        await env.ledger.reserve(key, MODEL, 401, 100)
    assert info.value.retry_after == 60
    second = await env.ledger.reserve(key, MODEL, 400, 100)  # exactly 1000 in the window
    clock[0] += 1
    await env.ledger.settle(first, usage(600, 50))  # completion tokens count too
    await env.ledger.settle(second, usage(400, 0))
    with pytest.raises(RateLimitError):
        await env.ledger.reserve(key, MODEL, 1, 1)
    clock[0] = 2_000_060.5  # the prompts left the window; the 50 completion tokens have not
    with pytest.raises(RateLimitError) as info:
        await env.ledger.reserve(key, MODEL, 951, 1)
    assert info.value.retry_after == 1
    third = await env.ledger.reserve(key, MODEL, 950, 1)
    await env.ledger.void(third)


@pytest.mark.anyio
async def test_concurrency_limit_counts_pending_reservations(env: Env) -> None:
    _, key = await env.key("busy", KeyLimits(concurrency=2, credits=NANO))
    a = await env.ledger.reserve(key, MODEL, 5, 5)
    b = await env.ledger.reserve(key, MODEL, 5, 5)
    with pytest.raises(RateLimitError) as info:
        await env.ledger.reserve(key, MODEL, 5, 5)
    assert info.value.retry_after == 1
    assert "concurrent" in info.value.message
    await env.ledger.settle(a, usage(5, 5))
    c = await env.ledger.reserve(key, MODEL, 5, 5)
    with pytest.raises(RateLimitError):
        await env.ledger.reserve(key, MODEL, 5, 5)
    await env.ledger.void(b)
    await env.ledger.void(c)
    d = await env.ledger.reserve(key, MODEL, 5, 5)
    await env.ledger.void(d)


@pytest.mark.anyio
async def test_allowed_models(env: Env) -> None:
    _, key = await env.key("picky", KeyLimits(models=["m1", "m2"]))
    with pytest.raises(PermissionDeniedError) as info:
        await env.ledger.reserve(key, "other", 5, 5)
    assert info.value.status_code == 403
    assert (info.value.error_type, info.value.code) == ("permission_error", "model_not_allowed")
    for model in ("m1", "m2"):
        await env.ledger.void(await env.ledger.reserve(key, model, 5, 5))
    assert (await env.keys.get("picky")).allowed_models == ["m1", "m2"]


@pytest.mark.anyio
async def test_expired_key(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    plaintext, _ = await env.keys.create("old", KeyLimits(expires="2001-01-01"))
    with pytest.raises(AuthenticationError, match="expired"):
        await env.keys.authenticate(plaintext)
    # A key that expires between authentication and admission is refused at admission.
    plaintext, key = await env.key("soon", KeyLimits(expires="2999-01-01T00:00:00Z"))
    ticket = await env.ledger.reserve(key, MODEL, 5, 5)
    monkeypatch.setattr(ledger_mod, "utcnow", lambda: "2999-01-01T00:00:00.001Z")
    with pytest.raises(AuthenticationError, match="expired") as info:
        await env.ledger.reserve(key, MODEL, 5, 5)
    assert info.value.status_code == 401
    await env.ledger.settle(ticket, usage(5, 5))  # what already ran is still billed
    assert (await env.row("soon"))["requests"] == 1


@pytest.mark.anyio
async def test_revoked_key(env: Env) -> None:
    plaintext, key = await env.key("gone", KeyLimits(credits=NANO))
    ticket = await env.ledger.reserve(key, MODEL, 5, 5)
    await env.keys.revoke("gone")
    with pytest.raises(AuthenticationError, match="revoked"):
        await env.keys.authenticate(plaintext)
    with pytest.raises(AuthenticationError, match="revoked"):
        await env.ledger.reserve(key, MODEL, 5, 5)
    assert await env.ledger.settle(ticket, usage(5, 3)) == expected_cost(5, 3)
    summary = await env.keys.get("gone")
    assert summary.revoked and summary.revoked_at is not None
    assert summary.balance == format_credits(NANO - expected_cost(5, 3))


# -- allowance, starter credits, top-ups -------------------------------------------------------


class _FakeDatetime(datetime):
    current = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)

    @classmethod
    def now(cls, tz: Any = None) -> _FakeDatetime:  # type: ignore[override]
        return cls.fromtimestamp(cls.current.timestamp(), tz)


@pytest.mark.anyio
async def test_daily_allowance_is_credited_lazily_once_per_day(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_mod, "datetime", _FakeDatetime)
    _FakeDatetime.current = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)
    allowance = 2 * NANO
    limits = KeyLimits(credits=NANO, allowance=allowance, allowance_period="day")
    _, key = await env.key("daily", limits)
    assert (await env.row("daily"))["balance"] == NANO  # lazily: nothing credited yet
    ticket = await env.ledger.reserve(key, MODEL, 10, 10)
    assert (await env.row("daily"))["balance"] == NANO + allowance
    assert (await env.row("daily"))["allowance_granted"] == "2030-01-01"
    await env.ledger.settle(ticket, usage(10, 10))
    _FakeDatetime.current = datetime(2030, 1, 1, 23, 59, tzinfo=UTC)
    await env.ledger.void(await env.ledger.reserve(key, MODEL, 10, 10))  # same day: no more
    assert [k for k, _ in await env.ledger_rows("daily")] == ["topup", "allowance", "usage"]
    _FakeDatetime.current = datetime(2030, 1, 2, 0, 1, tzinfo=UTC)
    await env.ledger.void(await env.ledger.reserve(key, MODEL, 10, 10))
    _FakeDatetime.current = datetime(2030, 1, 5, 0, 1, tzinfo=UTC)  # days skipped: one grant
    await env.ledger.void(await env.ledger.reserve(key, MODEL, 10, 10))
    rows = await env.ledger_rows("daily")
    assert rows == [
        ("topup", NANO),
        ("allowance", allowance),
        ("usage", -expected_cost(10, 10)),
        ("allowance", allowance),
        ("allowance", allowance),
    ]
    assert (await env.row("daily"))["balance"] == sum(a for _, a in rows)


@pytest.mark.anyio
async def test_monthly_allowance_and_a_key_living_on_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_mod, "_period", lambda kind, now: f"period-{kind}-1")
    _, key = await env.key("monthly", KeyLimits(allowance=NANO, allowance_period="month"))
    # Only an allowance: the key is limited from the start (balance 0 until the first grant).
    assert (await env.keys.get("monthly")).balance == 0
    ticket = await env.ledger.reserve(key, MODEL, 10, 10)
    await env.ledger.settle(ticket, usage(10, 10))
    assert (await env.row("monthly"))["balance"] == NANO - expected_cost(10, 10)
    # An allowance too small for the request: refused, and the grant is not lost either.
    monkeypatch.setattr(ledger_mod, "_period", lambda kind, now: f"period-{kind}-2")
    with pytest.raises(InsufficientQuotaError):
        await env.ledger.reserve(key, MODEL, 10**6, 10**6 * 10)
    assert (await env.row("monthly"))["allowance_granted"] == "period-month-1"
    await env.ledger.void(await env.ledger.reserve(key, MODEL, 1, 1))
    assert (await env.row("monthly"))["allowance_granted"] == "period-month-2"
    assert [k for k, _ in await env.ledger_rows("monthly")] == ["allowance", "usage", "allowance"]


@pytest.mark.anyio
async def test_unlimited_key_cannot_have_an_allowance(env: Env) -> None:
    with pytest.raises(InvalidRequestError, match="allowance"):
        await env.keys.create("x", KeyLimits(unlimited=True, allowance=NANO))


@pytest.mark.anyio
async def test_starter_credits(env: Env) -> None:
    starter = 5 * NANO
    await env.keys.create("plain", starter_credits=starter)
    await env.keys.create("funded", KeyLimits(credits=2 * NANO), starter_credits=starter)
    await env.keys.create("free", KeyLimits(unlimited=True), starter_credits=starter)
    await env.keys.create("nostarter", starter_credits=None)
    await env.keys.create("zerostarter", starter_credits=0)
    assert (await env.keys.get("plain")).balance == 5
    assert await env.ledger_rows("plain") == [("starter", starter)]
    assert (await env.keys.get("funded")).balance == 2
    assert await env.ledger_rows("funded") == [("topup", 2 * NANO)]
    for name in ("free", "nostarter", "zerostarter"):
        assert (await env.keys.get(name)).balance is None
        assert await env.ledger_rows(name) == []


@pytest.mark.anyio
async def test_topups(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    assert (await env.keys.topup("alice", parse_credits("0.5"))).balance == Decimal("1.5")
    ticket = await env.ledger.reserve(key, MODEL, 1000, 1000)  # holds 0.0012
    with pytest.raises(InvalidRequestError, match="negative"):
        await env.keys.topup("alice", -parse_credits("1.5"))  # would eat into the hold
    assert (await env.keys.topup("alice", -parse_credits("1.4988"))).balance == Decimal("0.0012")
    with pytest.raises(InvalidRequestError):
        await env.keys.topup("alice", MAX_NANOS)  # would overflow SQLite's INTEGER
    await env.ledger.settle(ticket, usage(1000, 1000))
    assert (await env.keys.get("alice")).balance == 0
    kinds = [k for k, _ in await env.ledger_rows("alice")]
    assert kinds == ["topup", "topup", "topup", "usage"]

    await env.keys.create("free", KeyLimits(unlimited=True))
    with pytest.raises(InvalidRequestError, match="unlimited"):
        await env.keys.topup("free", NANO)
    assert await env.ledger_rows("free") == []
    with pytest.raises(NotFoundError):
        await env.keys.topup("nobody", NANO)


# -- recovery ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_recover_voids_what_a_crash_left_pending(env: Env) -> None:
    _, key = await env.key("alice", KeyLimits(credits=NANO))
    _, free = await env.key("free", KeyLimits(unlimited=True))
    done = await env.ledger.reserve(key, MODEL, 100, 100)
    cost = await env.ledger.settle(done, usage(100, 10))
    stuck = [
        await env.ledger.reserve(key, MODEL, 100, 100),
        await env.ledger.reserve(free, MODEL, 100, 100),
        await env.ledger.reserve(key, MODEL, 7, 3),
    ]
    assert await env.pending() == 3
    # The "crash": the process goes away; a new one opens the same file.
    await env.db.close()
    env.db = await Database.open(env.path)
    env.keys, env.ledger = KeyStore(env.db), Ledger(env.db)
    assert await env.ledger.recover() == 3
    assert await env.pending() == 0
    assert await env.ledger.recover() == 0
    statuses = await env.db.fetchall("SELECT status FROM reservations ORDER BY id")
    assert [r[0] for r in statuses] == ["settled", "voided", "voided", "voided"]
    for name in ("alice", "free"):
        assert (await env.row(name))["reserved"] == 0
    assert (await env.row("alice"))["balance"] == NANO - (cost or 0)
    for ticket in stuck:  # a stream's late settlement after recovery changes nothing
        assert await env.ledger.settle(ticket, usage(100, 5)) is None
    assert len(await env.events("alice")) == 1
    assert await env.db.integrity_check() == "ok"


# -- the admission race ------------------------------------------------------------------------


async def _race(ledgers: list[Ledger], key: ApiKey, n: int) -> list[Ticket | BaseException]:
    return await asyncio.gather(
        *(ledgers[i % len(ledgers)].reserve(key, MODEL, 120, 64) for i in range(n)),
        return_exceptions=True,
    )


@pytest.mark.anyio
async def test_twenty_concurrent_reservations_for_one_request_worth(env: Env) -> None:
    amount = expected_cost(120, 64)
    _, key = await env.key("racer", KeyLimits(credits=amount))
    before = (await env.row("racer"))["balance"]
    results = await _race([env.ledger], key, 20)
    admitted = [r for r in results if isinstance(r, Ticket)]
    refused = [r for r in results if isinstance(r, InsufficientQuotaError)]
    assert len(admitted) == 1, results
    assert len(refused) == 19, results
    row = await env.row("racer")
    assert row["balance"] == amount and row["reserved"] == amount
    cost = await env.ledger.settle(admitted[0], usage(120, 17))
    assert cost == expected_cost(120, 17)
    row = await env.row("racer")
    assert row["balance"] >= 0 and row["reserved"] == 0
    usage_sum = sum(a for k, a in await env.ledger_rows("racer") if k == "usage")
    assert usage_sum == row["balance"] - before == -cost
    assert row["requests"] == 1


@pytest.mark.anyio
async def test_reservation_race_across_two_connections(env: Env) -> None:
    """Two processes' worth of writers (e.g. two Database objects) on one file."""
    amount = expected_cost(120, 64)
    _, key = await env.key("racer", KeyLimits(credits=amount))
    other = await Database.open(env.path)
    try:
        results = await _race([env.ledger, Ledger(other)], key, 20)
    finally:
        await other.close()
    admitted = [r for r in results if isinstance(r, Ticket)]
    assert len(admitted) == 1, results
    assert sum(isinstance(r, InsufficientQuotaError) for r in results) == 19
    await env.ledger.settle(admitted[0], usage(120, 64))
    assert (await env.row("racer"))["balance"] == 0


@pytest.mark.anyio
async def test_many_concurrent_settlements_add_up(env: Env) -> None:
    _, key = await env.key("busy", KeyLimits(credits=NANO))
    tickets = await asyncio.gather(*(env.ledger.reserve(key, MODEL, i, 50) for i in range(1, 41)))
    costs = await asyncio.gather(
        *(env.ledger.settle(t, usage(i + 1, i % 50)) for i, t in enumerate(tickets)),
        *(env.ledger.settle(t, usage(i + 1, 0)) for i, t in enumerate(tickets)),  # duplicates
    )
    billed = [c for c in costs if c is not None]
    assert len(billed) == 40
    row = await env.row("busy")
    assert row["balance"] == NANO - sum(billed)
    assert row["requests"] == 40
    events = await env.events("busy")
    assert sum(e["cost"] for e in events) == sum(billed)
    assert sorted(e["reservation_id"] for e in events) == sorted(t.id for t in tickets)


@pytest.mark.anyio
async def test_admission_never_walks_a_keys_whole_history(env: Env) -> None:
    """Every query in reserve/settle on reservations is bounded by time, id or pending rows:
    an old key's lifetime of settled reservations must not slow (or serialise) admissions."""
    limits = KeyLimits(credits=NANO, rpm=10**6, tpm=10**9, concurrency=5)
    _, key = await env.key("old", limits)
    statements: list[str] = []
    writer = env.db._writer
    await writer.set_trace_callback(statements.append)
    try:
        await env.ledger.settle(await env.ledger.reserve(key, MODEL, 5, 5), usage(5, 5))
    finally:
        await writer.set_trace_callback(None)
    checked = 0
    for sql in statements:
        if "reservations" not in sql or sql.split()[0].upper() not in ("SELECT", "UPDATE"):
            continue
        plan = [row[3] for row in await env.db.fetchall("EXPLAIN QUERY PLAN " + sql)]
        checked += 1
        assert not any(step.endswith("reservations_key (key_id=?)") for step in plan), (sql, plan)
        assert not any(step.startswith("SCAN reservations") for step in plan), (sql, plan)
    assert checked >= 3
