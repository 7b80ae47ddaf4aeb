"""Accounting overhead and ledger throughput on a real SQLite file (no engine, no HTTP).

    .venv/bin/python bench/ledger_bench.py [--data-dir DIR]

Prints: the time one request spends in ``reserve`` + ``settle`` (mean and percentiles over
200 requests), and settlements per second for ~500 sequential reserve+settle pairs and for the
same work split over 8 concurrent tasks. The limited key first gets ``--history`` old settled
reservations, as a key in use for months would have. Every commit is ``synchronous=FULL``
(an fsync), so the figures depend mostly on the disk under DIR (default: a fresh temp dir).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiosqlite

from appliance.store.db import Database
from appliance.store.keys import ApiKey, KeyLimits, KeyStore
from appliance.store.ledger import Ledger, Settlement
from appliance.store.money import NANO

MODEL = "bench-model"
PROMPT, MAX_TOKENS, COMPLETION = 200, 256, 120


def _usage() -> Settlement:
    return Settlement(
        status="stop",
        prompt_tokens=PROMPT,
        completion_tokens=COMPLETION,
        started="2030-01-01T00:00:00.000Z",
    )


async def _pair(ledger: Ledger, key: ApiKey) -> None:
    ticket = await ledger.reserve(key, MODEL, PROMPT, MAX_TOKENS)
    await ledger.settle(ticket, _usage())


async def _key(keys: KeyStore, name: str, **limits: object) -> ApiKey:
    plaintext, _ = await keys.create(name, KeyLimits(**limits))  # type: ignore[arg-type]
    return await keys.authenticate(plaintext)


async def _seed_history(db: Database, key_id: int, n: int) -> None:
    """Old, settled reservations: what months of use leave behind (outside every window)."""
    long_ago = time.time() - 86_400

    async def write(conn: aiosqlite.Connection) -> None:
        await conn.executemany(
            "INSERT INTO reservations (key_id, model, prompt_tokens, max_tokens, amount, "
            "created, status) VALUES (?, ?, 1, 1, 1, ?, 'settled')",
            ((key_id, MODEL, long_ago + i * 1e-3) for i in range(n)),
        )

    await db.write(write)


async def bench(data_dir: Path, history: int) -> None:
    db = await Database.open(data_dir)
    keys, ledger = KeyStore(db), Ledger(db)
    # A limited key with every check switched on (the slowest admission path).
    funded = await _key(keys, "funded", credits=10**6 * NANO, rpm=10**6, tpm=10**9, concurrency=64)
    unlimited = await _key(keys, "unlimited", unlimited=True)
    for _ in range(20):  # warm up caches and the WAL
        await _pair(ledger, funded)

    print(f"SQLite file: {db.path}  (journal_mode=WAL, synchronous=FULL)")
    if history:
        await _seed_history(db, funded.id, history)
        print(f"the limited key has {history} settled reservations from earlier days")
    cases = (("unlimited key", unlimited), ("limited key (credits+rpm+tpm+concurrency)", funded))
    for label, key in cases:
        reserve_ms, settle_ms, total_ms = [], [], []
        for _ in range(200):
            t0 = time.perf_counter()
            ticket = await ledger.reserve(key, MODEL, PROMPT, MAX_TOKENS)
            t1 = time.perf_counter()
            await ledger.settle(ticket, _usage())
            t2 = time.perf_counter()
            reserve_ms.append((t1 - t0) * 1e3)
            settle_ms.append((t2 - t1) * 1e3)
            total_ms.append((t2 - t0) * 1e3)
        q = statistics.quantiles(total_ms, n=100)
        print(
            f"overhead per request, {label}, n=200: "
            f"mean {statistics.fmean(total_ms):.2f} ms "
            f"(reserve {statistics.fmean(reserve_ms):.2f} + settle "
            f"{statistics.fmean(settle_ms):.2f}), p50 {q[49]:.2f}, p95 {q[94]:.2f}, "
            f"max {max(total_ms):.2f} ms"
        )

    n = 500
    t0 = time.perf_counter()
    for _ in range(n):
        await _pair(ledger, funded)
    elapsed = time.perf_counter() - t0
    print(f"throughput, sequential: {n} reserve+settle pairs in {elapsed:.2f} s "
          f"= {n / elapsed:.0f} settlements/s")  # fmt: skip

    tasks, per_task = 8, n // 8

    async def worker() -> None:
        for _ in range(per_task):
            await _pair(ledger, funded)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - t0
    done = tasks * per_task
    print(f"throughput, {tasks} concurrent tasks: {done} pairs in {elapsed:.2f} s "
          f"= {done / elapsed:.0f} settlements/s")  # fmt: skip

    problems = await ledger.check_consistency()
    events = await db.fetchone("SELECT count(*) FROM usage_events")
    assert events is not None
    print(f"usage events written: {events[0]}; consistency problems: {problems or 'none'}")
    await db.close()
    if problems:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="where to put the database (default: temp)")
    parser.add_argument(
        "--history",
        type=int,
        default=100_000,
        help="old settled reservations to give the limited key first (default 100000)",
    )
    args = parser.parse_args()
    if args.data_dir is not None:
        asyncio.run(bench(args.data_dir, args.history))
        return
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        asyncio.run(bench(Path(tmp), args.history))


if __name__ == "__main__":
    main()
