"""Billing through the real server (SmolLM2, ``--threads 1 --ctx-size 1024 --parallel 4``):
the admission race, per-key limits side by side, a cancelled stream, a SIGKILL mid-stream,
and plaintext keys that never leak into logs, files or listings."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from appliance.store.db import Database
from appliance.store.ledger import Ledger
from appliance.store.money import NANO
from tests.e2e.billing_support import BillingServer, cost, credits_text, open_stream

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SHORT = "Say hello."
LONG = "Count from 1 to 500, one number per line."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BillingServer]:
    running = BillingServer(tmp_path_factory.mktemp("billing"))
    running.start()
    try:
        yield running
    finally:
        returncode = running.stop()
    log = running.log()
    assert "Traceback" not in log, log[-4000:]
    assert returncode == 0, log[-4000:]


def _error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- 4. the admission race ---------------------------------------------------------------------


def test_twenty_concurrent_requests_on_one_request_worth_of_credits(server: BillingServer) -> None:
    max_tokens = 16
    probe_key = server.create_key("race-probe", "--unlimited")
    with httpx.Client(timeout=120) as client:
        probe = server.chat(client, probe_key, SHORT, 1)
    assert probe.status_code == 200, probe.text
    prompt = probe.json()["usage"]["prompt_tokens"]
    hold = cost(prompt, max_tokens)  # exactly what admission holds for one request
    key = server.create_key("racer", "--credits", credits_text(hold))
    assert server.keys()["racer"]["balance"] == hold

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            body = {
                "messages": [{"role": "user", "content": SHORT}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            headers = {"Authorization": f"Bearer {key}"}
            url = server.base_url + "/v1/chat/completions"
            return await asyncio.gather(
                *(client.post(url, json=body, headers=headers) for _ in range(20))
            )

    responses = asyncio.run(fire())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [429] * 19, [(r.status_code, r.text[:200]) for r in responses]
    for refused in (r for r in responses if r.status_code == 429):
        error = _error(refused)
        assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    (ok,) = (r for r in responses if r.status_code == 200)
    usage = ok.json()["usage"]
    assert usage["prompt_tokens"] == prompt
    assert 0 < usage["completion_tokens"] <= max_tokens

    listed = server.wait_settled("racer", 1)
    billed = cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert listed["requests"] == 1
    assert listed["prompt_tokens"] == usage["prompt_tokens"]
    assert listed["completion_tokens"] == usage["completion_tokens"]
    assert listed["spent"] == billed
    assert listed["balance"] == hold - billed >= 0
    assert listed["reserved"] == 0
    (ledger_sum,) = server.query(
        "SELECT sum(c.amount) FROM credit_ledger c JOIN keys k ON k.id = c.key_id "
        "WHERE k.name = 'racer'"
    )[0]
    assert Decimal(ledger_sum) / NANO == listed["balance"]
    assert server.query("SELECT count(*) FROM reservations WHERE status = 'pending'")[0][0] == 0


# -- 7. two keys with different limits, side by side --------------------------------------------


def test_per_key_limits_under_concurrent_use(server: BillingServer) -> None:
    limited = server.create_key("limited", "--credits", "5", "--rpm", "3", "--concurrency", "1")
    free = server.create_key("free", "--unlimited")
    picky = server.create_key("picky", "--models", "other")
    gone = server.create_key("gone")
    assert server.cli("keys", "revoke", "gone").returncode == 0
    usages: dict[str, list[dict[str, Any]]] = {"limited": [], "free": []}

    def free_request() -> httpx.Response:
        with httpx.Client(timeout=120) as own:
            return server.chat(own, free, SHORT, 12)

    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(3) as pool:
        stream = open_stream(server, client, limited, LONG, 60)
        try:
            stream.read_content_chunks(1)
            others = [pool.submit(free_request) for _ in range(3)]  # the other key, meanwhile
            # The limited key already has one request in flight: its concurrency is 1.
            second = server.chat(client, limited, SHORT, 8)
            assert second.status_code == 429, second.text
            error = _error(second)
            assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
            assert "concurrent" in error["message"]
            assert second.headers["Retry-After"] == "1"
            usage = stream.read_to_end()
        finally:
            stream.response.close()
        assert usage is not None
        usages["limited"].append(usage)
        for future in others:
            response = future.result()
            assert response.status_code == 200, response.text
            usages["free"].append(response.json()["usage"])

    server.wait_settled("limited", 1)  # the stream's hold is released: concurrency is free
    with httpx.Client(timeout=120) as client:
        for _ in range(2):  # requests 2 and 3 of this minute
            response = server.chat(client, limited, SHORT, 8)
            assert response.status_code == 200, response.text
            usages["limited"].append(response.json()["usage"])
            server.wait_settled("limited", len(usages["limited"]))
        over = server.chat(client, limited, SHORT, 8)  # the 4th within a minute
        assert over.status_code == 429, over.text
        error = _error(over)
        assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
        assert "per minute" in error["message"]
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        for _ in range(2):  # the unlimited key has no rate limit: 5 requests are fine
            response = server.chat(client, free, SHORT, 12)
            assert response.status_code == 200, response.text
            usages["free"].append(response.json()["usage"])

        denied = server.chat(client, picky, SHORT, 8)
        assert denied.status_code == 403, denied.text
        error = _error(denied)
        assert (error["type"], error["code"]) == ("permission_error", "model_not_allowed")
        revoked = server.chat(client, gone, SHORT, 8)
        assert revoked.status_code == 401, revoked.text
        assert _error(revoked)["type"] == "authentication_error"

    for name, credits in (("limited", Decimal(5)), ("free", None)):
        listed = server.wait_settled(name, len(usages[name]))
        spent = sum(
            (cost(u["prompt_tokens"], u["completion_tokens"]) for u in usages[name]), Decimal(0)
        )
        assert listed["requests"] == len(usages[name])
        assert listed["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages[name])
        assert listed["completion_tokens"] == sum(u["completion_tokens"] for u in usages[name])
        assert listed["spent"] == spent
        assert listed["reserved"] == 0
        if credits is None:
            assert listed["balance"] is None
        else:
            assert listed["balance"] == credits - spent
    listed = server.keys()
    for name in ("picky", "gone"):
        assert listed[name]["requests"] == 0 and listed[name]["spent"] == 0
    assert listed["gone"]["revoked"] is True
    assert listed["limited"]["rpm"] == 3 and listed["limited"]["concurrency"] == 1
    assert listed["picky"]["allowed_models"] == ["other"]


# -- 8. a stream the client abandons ------------------------------------------------------------


def test_cancelled_stream_is_billed_for_exactly_what_was_generated(server: BillingServer) -> None:
    key = server.create_key("canceller", "--credits", "5")
    with httpx.Client(timeout=120) as client:
        stream = open_stream(server, client, key, LONG, 300)
        try:
            stream.read_content_chunks(3)
            seen = stream.content_chunks()
        finally:
            stream.response.close()  # the client goes away mid-stream
    listed = server.wait_settled("canceller", 1)
    (event,) = server.usage_events("canceller")
    assert event["status"] == "cancelled"
    assert seen <= event["completion_tokens"] < 300
    billed = cost(event["prompt_tokens"], event["completion_tokens"])
    assert Decimal(event["cost"]) / NANO == billed
    assert listed["completion_tokens"] == event["completion_tokens"]
    assert listed["prompt_tokens"] == event["prompt_tokens"]
    assert listed["spent"] == billed
    assert listed["balance"] == Decimal(5) - billed


def test_clients_gone_before_the_first_byte_leave_no_hold(server: BillingServer) -> None:
    """Streams whose client hangs up right after sending: every hold is voided or settled,
    the balance matches the recorded usage, and the key's one concurrency slot is free."""
    key = server.create_key("hangup", "--credits", "5", "--concurrency", "1")
    body = json.dumps(
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 200, "stream": True}
    ).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    for _ in range(8):
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(request)
            conn.shutdown(socket.SHUT_WR)  # hang up before any response byte is read
        time.sleep(0.05)
    deadline = time.monotonic() + 30
    while True:
        listed = server.keys()["hangup"]
        if listed["reserved"] == 0:
            break
        assert time.monotonic() < deadline, f"holds left pending: {listed}"
        time.sleep(0.1)
    events = server.usage_events("hangup")
    billed = sum((Decimal(e["cost"]) for e in events), Decimal(0)) / NANO
    assert listed["balance"] == Decimal(5) - billed
    assert listed["spent"] == billed
    # The single concurrency slot is free again.
    with httpx.Client(timeout=120) as client:
        response = server.chat(client, key, SHORT, 4)
    assert response.status_code == 200, response.text


# -- 1. secrets ----------------------------------------------------------------------------------


def test_plaintext_keys_never_leak(server: BillingServer) -> None:
    """Runs last in this module: every key the tests used is searched for everywhere."""
    keys = list(server.plaintext_keys)
    assert len(keys) >= 6
    with httpx.Client(timeout=60) as client:  # a failing request with each, for the logs too
        for key in keys:
            server.chat(client, key, SHORT, 1, model="no-such-model")
    secrets = keys + [k[12:] for k in keys]  # the part after the shown prefix
    log = server.log()
    assert "Uvicorn running" in log or "Application startup complete" in log
    table = server.cli("keys", "list")
    as_json = server.cli("keys", "list", "--json")
    assert table.returncode == 0 and as_json.returncode == 0
    files = {
        path.name: path.read_bytes()
        for path in server.data_dir.iterdir()
        if path.name.startswith("appliance.db")
    }
    assert "appliance.db-wal" in files  # the server is running: recent writes sit in the WAL
    for secret in secrets:
        assert secret not in log
        assert secret not in table.stdout + table.stderr
        assert secret not in as_json.stdout + as_json.stderr
        for name, data in files.items():
            assert secret.encode() not in data, name
    for key in keys:  # what the listing shows instead
        assert key[:12] in table.stdout and key[:12] in as_json.stdout


# -- 6. SIGKILL mid-stream -----------------------------------------------------------------------


def test_sigkill_mid_stream_loses_no_committed_usage(tmp_path: Path) -> None:
    server = BillingServer(tmp_path)
    server.start()
    try:
        _crash_and_recover(server)
    finally:
        server.stop()
    assert "Traceback" not in server.log(), server.log()[-4000:]


def _crash_and_recover(server: BillingServer) -> None:
    funded = server.create_key("funded", "--credits", "10")
    free = server.create_key("free", "--unlimited")
    with httpx.Client(timeout=120) as client:
        for key in (funded, free):  # usage settled well before the crash
            assert server.chat(client, key, SHORT, 8).status_code == 200
    server.wait_settled("funded", 1)
    server.wait_settled("free", 1)

    streaming = [threading.Event() for _ in range(4)]
    problems: list[BaseException] = []

    def stream(i: int, key: str) -> None:
        with httpx.Client(timeout=60) as client:
            try:
                opened = open_stream(server, client, key, LONG, 300)
            except BaseException as exc:
                problems.append(exc)
                streaming[i].set()
                return
            try:
                opened.read_content_chunks(3)
                streaming[i].set()
                opened.read_to_end()  # until the kill cuts it
            except BaseException as exc:
                if not streaming[i].is_set():
                    problems.append(exc)
                streaming[i].set()
            finally:
                opened.response.close()

    threads = [
        threading.Thread(target=stream, args=(i, funded if i % 2 else free), daemon=True)
        for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for event in streaming:
        assert event.wait(90), "a stream did not start"
    assert problems == []
    before = {r["id"]: dict(r) for r in server.query("SELECT * FROM usage_events")}
    pending = [
        r["id"] for r in server.query("SELECT id FROM reservations WHERE status = 'pending'")
    ]
    assert pending, "no stream was in flight"
    server.kill()
    for thread in threads:
        thread.join(30)

    killed_log = server.log()
    server.start()  # same data dir: recovery runs in the lifespan
    restart_log = server.log()[len(killed_log) :]
    match = re.search(r"voided (\d+) reservations left pending", restart_log)
    assert match is not None, restart_log
    assert int(match.group(1)) >= 1

    rows = server.query("PRAGMA integrity_check")
    assert [r[0] for r in rows] == ["ok"]
    assert server.query("SELECT count(*) FROM reservations WHERE status = 'pending'")[0][0] == 0
    statuses = {
        r["id"]: r["status"]
        for r in server.query(
            f"SELECT id, status FROM reservations WHERE id IN ({','.join('?' * len(pending))})",
            tuple(pending),
        )
    }
    after = {r["id"]: dict(r) for r in server.query("SELECT * FROM usage_events")}
    for rid, status in statuses.items():  # a stream that ended just before the kill is billed
        assert status in ("voided", "settled")
        assert (status == "settled") == any(e["reservation_id"] == rid for e in after.values())
    for event_id, event in before.items():  # committed usage is never lost
        assert after.get(event_id) == event
    print(
        f"\n{len(before)} usage events committed before the kill, all kept; {len(pending)} "
        f"reservations were pending, statuses now {sorted(statuses.values())}"
    )

    async def consistency() -> tuple[str, list[str]]:
        db = await Database.open(server.data_dir)
        try:
            return await db.integrity_check(), await Ledger(db).check_consistency()
        finally:
            await db.close()

    assert asyncio.run(consistency()) == ("ok", [])
    _assert_books(server, {"funded": Decimal(10), "free": None})

    # The restarted server serves and bills the same keys.
    with httpx.Client(timeout=120) as client:
        assert server.chat(client, funded, SHORT, 8).status_code == 200
    server.wait_settled("funded", len(server.usage_events("funded")))
    _assert_books(server, {"funded": Decimal(10), "free": None})


def _assert_books(server: BillingServer, credits: dict[str, Decimal | None]) -> None:
    listed = server.keys()
    for name, start in credits.items():
        events = server.usage_events(name)
        spent = sum((cost(e["prompt_tokens"], e["completion_tokens"]) for e in events), Decimal(0))
        assert sum(Decimal(e["cost"]) for e in events) / NANO == spent
        key = listed[name]
        assert key["reserved"] == 0
        assert key["requests"] == len(events)
        assert key["prompt_tokens"] == sum(e["prompt_tokens"] for e in events)
        assert key["completion_tokens"] == sum(e["completion_tokens"] for e in events)
        assert key["spent"] == spent
        if start is None:
            assert key["balance"] is None
        else:
            assert key["balance"] == start - spent >= 0
