"""A Hypothesis state machine over the credits ledger on a real SQLite file.

Rules create keys (credits, unlimited or starter credits, some with a concurrency limit),
reserve, settle (random completion <= max_tokens), void, revoke, top up, and "restart" (close
the database, reopen it, ``Ledger.recover()``). A plain-Python model predicts every outcome
exactly; after every step the database must agree with the model and with itself: balance >= 0,
balance == sum(credit_ledger), reserved == sum(pending reservations), spent == sum(usage costs).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from appliance.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    InvalidRequestError,
    RateLimitError,
)
from appliance.store.db import Database
from appliance.store.keys import ApiKey, KeyLimits, KeyStore
from appliance.store.ledger import Ledger, Settlement, Ticket
from appliance.store.money import cost_of

T = TypeVar("T")
IN, OUT = 300_000_000, 900_000_000  # the default prices, nano-credits per 1M tokens
MODEL = "m"


@dataclass
class ModelKey:
    """What the model believes about one key."""

    api: ApiKey
    balance: int | None  # None = unlimited
    concurrency: int | None
    reserved: int = 0
    spent: int = 0
    revoked: bool = False
    requests: int = 0
    pending: list[Ticket] = field(default_factory=list)


@dataclass
class Held:
    ticket: Ticket
    prompt: int
    max_tokens: int


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="ledger-sm-"))
        self.db = self.run(Database.open(self.dir))
        self.keys = KeyStore(self.db)
        self.ledger = Ledger(self.db)
        self.model: dict[str, ModelKey] = {}
        self.held: list[Held] = []
        self.resolved: list[Ticket] = []  # settled, voided or recovered

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.db.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- rules ---------------------------------------------------------------------------------
    @initialize(
        funded=st.integers(0, 5_000_000), concurrency=st.one_of(st.none(), st.integers(1, 3))
    )
    def first_keys(self, funded: int, concurrency: int | None) -> None:
        self.create_key("credits", funded, 0, concurrency)
        self.create_key("unlimited", 0, 0, None)

    @rule(
        kind=st.sampled_from(["credits", "unlimited", "starter", "default"]),
        amount=st.integers(0, 5_000_000),
        starter=st.integers(0, 5_000_000),
        concurrency=st.one_of(st.none(), st.integers(1, 3)),
    )
    def create_key(self, kind: str, amount: int, starter: int, concurrency: int | None) -> None:
        name = f"k{len(self.model)}"
        limits = KeyLimits(
            credits=amount if kind == "credits" else None,
            unlimited=kind == "unlimited",
            concurrency=concurrency,
        )
        given = starter if kind in ("starter", "unlimited") else None
        plaintext, _ = self.run(self.keys.create(name, limits, starter_credits=given))
        if kind == "credits":
            balance: int | None = amount
        elif kind == "starter":
            balance = starter or None  # no starter credits: an unlimited key
        else:
            balance = None
        api = self.run(self.keys.authenticate(plaintext))
        self.model[name] = ModelKey(api=api, balance=balance, concurrency=concurrency)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), prompt=st.integers(0, 600), max_tokens=st.integers(0, 600))
    def reserve(self, data: st.DataObject, prompt: int, max_tokens: int) -> None:
        self._reserve(data.draw(st.sampled_from(sorted(self.model))), prompt, max_tokens)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        held = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self._settle(held, data)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), prompt=st.integers(0, 600), max_tokens=st.integers(0, 600))
    def whole_request(self, data: st.DataObject, prompt: int, max_tokens: int) -> None:
        """Reserve and, when admitted, settle at once (the common case, made frequent)."""
        held = self._reserve(data.draw(st.sampled_from(sorted(self.model))), prompt, max_tokens)
        if held is not None:
            self.held.remove(held)
            self._settle(held, data)

    def _reserve(self, name: str, prompt: int, max_tokens: int) -> Held | None:
        key = self.model[name]
        amount = cost_of(prompt, IN) + cost_of(max_tokens, OUT)
        if key.revoked:
            expected: type[Exception] | None = AuthenticationError
        elif key.concurrency is not None and len(key.pending) >= key.concurrency:
            expected = RateLimitError
        elif key.balance is not None and amount > key.balance - key.reserved:
            expected = InsufficientQuotaError
        else:
            expected = None
        try:
            ticket = self.run(self.ledger.reserve(key.api, MODEL, prompt, max_tokens))
        except (AuthenticationError, RateLimitError, InsufficientQuotaError) as exc:
            assert type(exc) is expected, (exc, expected)
            event(f"reserve refused: {type(exc).__name__}")
            return None
        assert expected is None, f"admitted, expected {expected}"
        event("reserve admitted")
        if len(self.held) >= 2:
            event("several reservations pending at once")
        assert ticket.amount == amount
        key.reserved += amount
        key.pending.append(ticket)
        held = Held(ticket, prompt, max_tokens)
        self.held.append(held)
        return held

    def _settle(self, held: Held, data: st.DataObject) -> None:
        completion = data.draw(st.integers(0, held.max_tokens))
        status = data.draw(st.sampled_from(["stop", "length", "cancelled", "error"]))
        usage = Settlement(
            status=status,
            prompt_tokens=held.prompt,
            completion_tokens=completion,
            started="2030-01-01T00:00:00.000Z",
        )
        cost = self.run(self.ledger.settle(held.ticket, usage))
        event("settled")
        expected = cost_of(held.prompt, IN) + cost_of(completion, OUT)
        assert cost == expected
        key = self._key_of(held.ticket)
        key.reserved -= held.ticket.amount
        key.pending.remove(held.ticket)
        key.spent += expected
        key.requests += 1
        if key.balance is not None:
            key.balance -= expected
        self.resolved.append(held.ticket)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        held = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.run(self.ledger.void(held.ticket))
        key = self._key_of(held.ticket)
        key.reserved -= held.ticket.amount
        key.pending.remove(held.ticket)
        self.resolved.append(held.ticket)

    @precondition(lambda self: self.resolved)
    @rule(data=st.data(), completion=st.integers(0, 100))
    def resolve_again(self, data: st.DataObject, completion: int) -> None:
        """A late or duplicate settle/void of a resolved reservation changes nothing."""
        ticket = data.draw(st.sampled_from(self.resolved))
        if data.draw(st.booleans()):
            usage = Settlement(
                status="stop",
                prompt_tokens=1,
                completion_tokens=completion,
                started="2030-01-01T00:00:00.000Z",
            )
            assert self.run(self.ledger.settle(ticket, usage)) is None
        else:
            self.run(self.ledger.void(ticket))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def revoke(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        summary = self.run(self.keys.revoke(name))
        assert summary.revoked
        self.model[name].revoked = True

    @precondition(lambda self: self.model)
    @rule(data=st.data(), amount=st.integers(-2_000_000, 3_000_000))
    def topup(self, data: st.DataObject, amount: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        key = self.model[name]
        ok = key.balance is not None and key.balance + amount >= key.reserved
        try:
            self.run(self.keys.topup(name, amount))
        except InvalidRequestError:
            assert not ok
            return
        assert ok
        assert key.balance is not None
        key.balance += amount

    @rule()
    def restart(self) -> None:
        """The process dies; a new one opens the file and voids what was left pending."""
        self.run(self.db.close())
        self.db = self.run(Database.open(self.dir))
        self.keys, self.ledger = KeyStore(self.db), Ledger(self.db)
        assert self.run(self.ledger.recover()) == len(self.held)
        event(f"restart with pending: {bool(self.held)}")
        for held in self.held:
            self.resolved.append(held.ticket)
        self.held.clear()
        for key in self.model.values():
            key.reserved = 0
            key.pending.clear()

    def _key_of(self, ticket: Ticket) -> ModelKey:
        return next(k for k in self.model.values() if k.api.id == ticket.key_id)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        rows = self.run(
            self.db.fetchall(
                "SELECT k.*, "
                "(SELECT COALESCE(sum(amount), 0) FROM credit_ledger c WHERE c.key_id = k.id) "
                "  AS ledger_sum, "
                "(SELECT COALESCE(sum(amount), 0) FROM reservations r "
                "  WHERE r.key_id = k.id AND r.status = 'pending') AS pending_sum, "
                "(SELECT count(*) FROM reservations r "
                "  WHERE r.key_id = k.id AND r.status = 'pending') AS pending_count, "
                "(SELECT COALESCE(sum(cost), 0) FROM usage_events u WHERE u.key_id = k.id) "
                "  AS usage_sum, "
                "(SELECT count(*) FROM usage_events u WHERE u.key_id = k.id) AS usage_count "
                "FROM keys k"
            )
        )
        assert len(rows) == len(self.model)
        for row in rows:
            key = self.model[row["name"]]
            if row["balance"] is not None:
                assert row["balance"] >= 0
                assert row["balance"] == row["ledger_sum"]
                assert row["balance"] - row["reserved"] >= 0
            else:
                assert row["ledger_sum"] == 0
            assert row["reserved"] == row["pending_sum"]
            assert row["spent"] == row["usage_sum"]
            assert row["requests"] == row["usage_count"]
            # ... and the database agrees with the model.
            assert row["balance"] == key.balance
            assert row["reserved"] == key.reserved
            assert row["spent"] == key.spent
            assert row["requests"] == key.requests
            assert row["pending_count"] == len(key.pending)
            assert (row["revoked"] is not None) == key.revoked
        assert self.run(self.ledger.check_consistency()) == []


LedgerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, database=None
)
TestLedgerStateMachine = LedgerMachine.TestCase
