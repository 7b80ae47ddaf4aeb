"""The Usage page (per key, per model, a tokens chart) and its CSV export.

Periods end now and start on a bucket boundary (the hour for 24h, midnight UTC for days),
so the tables and the chart always count the same events. Times in ``usage_events`` are ISO
8601 UTC strings of one fixed format, so comparing them as text orders them in time.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from litestar import Request, get
from litestar.response import Stream, Template

from appliance.admin.charts import Bar, bar_chart
from appliance.admin.forms import FormError
from appliance.admin.views import page
from appliance.api.deps import services
from appliance.store.db import Database
from appliance.store.money import format_credits

__all__ = ["PERIODS", "ROUTES", "period_start"]

PERIODS = {"24h": "Last 24 hours", "7d": "Last 7 days", "30d": "Last 30 days", "all": "All time"}
_CSV_BATCH = 2000


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def period_start(period: str, now: datetime) -> datetime | None:
    if period not in PERIODS:
        raise FormError(f"Unknown period '{period}': choose 24h, 7d, 30d or all.")
    if period == "24h":
        return now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
    if period == "all":
        return None
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=int(period[:-1]) - 1)


@dataclass(frozen=True, slots=True)
class UsageRow:
    label: str
    detail: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int
    cost_nanos: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


_SUMS = (
    "count(*) AS n, COALESCE(sum(u.prompt_tokens), 0) AS p, "
    "COALESCE(sum(u.completion_tokens), 0) AS c, "
    "COALESCE(sum(u.status = 'error'), 0) AS e, COALESCE(sum(u.cost), 0) AS cost"
)


async def _grouped(db: Database, by_key: bool, since: str) -> list[UsageRow]:
    if by_key:
        sql = (
            f"SELECT k.name AS label, k.prefix AS detail, {_SUMS} FROM usage_events u "
            "LEFT JOIN keys k ON k.id = u.key_id WHERE u.finished >= ? GROUP BY u.key_id "
            "ORDER BY p + c DESC, n DESC"
        )
    else:
        sql = (
            f"SELECT u.model AS label, '' AS detail, {_SUMS} FROM usage_events u "
            "WHERE u.finished >= ? GROUP BY u.model ORDER BY p + c DESC, n DESC"
        )
    rows = await db.fetchall(sql, (since,))
    return [
        UsageRow(
            label=r["label"] or "(deleted key)",
            detail=r["detail"] or "",
            requests=r["n"],
            prompt_tokens=r["p"],
            completion_tokens=r["c"],
            errors=r["e"],
            cost_nanos=r["cost"],
        )
        for r in rows
    ]


async def _chart(
    db: Database, period: str, start: datetime | None, now: datetime
) -> tuple[list[Bar], str]:
    if start is None:  # all time: from the first event's day
        row = await db.fetchone("SELECT min(finished) FROM usage_events")
        if row is None or row[0] is None:
            return [], "day"
        first = datetime.fromisoformat(row[0].replace("Z", "+00:00"))
        start = first.replace(hour=0, minute=0, second=0, microsecond=0)
    hourly = period == "24h"
    monthly = not hourly and (now - start).days > 92
    width, step = (13, "hour") if hourly else ((7, "month") if monthly else (10, "day"))
    rows = await db.fetchall(
        f"SELECT substr(finished, 1, {width}) AS b, COALESCE(sum(prompt_tokens), 0), "
        "COALESCE(sum(completion_tokens), 0) FROM usage_events WHERE finished >= ? GROUP BY b",
        (_iso(start),),
    )
    sums = {r[0]: (r[1], r[2]) for r in rows}
    bars = []
    cursor = start
    while cursor <= now:
        key = cursor.strftime({"hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m"}[step])
        prompt, completion = sums.get(key, (0, 0))
        if step == "hour":
            label, title = cursor.strftime("%H:00"), cursor.strftime("%Y-%m-%d %H:00 UTC")
            cursor += timedelta(hours=1)
        elif step == "day":
            label, title = cursor.strftime("%m-%d"), cursor.strftime("%Y-%m-%d")
            cursor += timedelta(days=1)
        else:
            label = title = cursor.strftime("%Y-%m")
            cursor = (cursor.replace(day=1) + timedelta(days=32)).replace(day=1)
        bars.append(Bar(label=label, title=title, prompt=prompt, completion=completion))
    return bars, step


async def usage_context(request: Request[Any, Any, Any], period: str) -> dict[str, Any]:
    db = services(request).db
    now = datetime.now(UTC)
    start = period_start(period, now)
    since = _iso(start) if start else ""
    per_key = await _grouped(db, True, since)
    per_model = await _grouped(db, False, since)
    bars, step = await _chart(db, period, start, now)
    caption = f"Tokens per {step}, {PERIODS[period].lower()}"
    return {
        "period": period,
        "periods": PERIODS,
        "per_key": per_key,
        "per_model": per_model,
        "totals": UsageRow(
            label="Total",
            detail="",
            requests=sum(r.requests for r in per_model),
            prompt_tokens=sum(r.prompt_tokens for r in per_model),
            completion_tokens=sum(r.completion_tokens for r in per_model),
            errors=sum(r.errors for r in per_model),
            cost_nanos=sum(r.cost_nanos for r in per_model),
        ),
        "chart": bar_chart(bars, caption=caption),
        "caption": caption,
        "since": start,
    }


@get("/usage")
async def usage_page(request: Request[Any, Any, Any], period: str = "7d") -> Template:
    return page(request, "usage", await usage_context(request, period))


def _cell(value: object) -> object:
    """Keep spreadsheet apps from running a key name as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def _csv_rows(db: Database, since: str) -> AsyncIterator[str]:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(
        [
            "id", "finished", "started", "key", "key_prefix", "model", "status",
            "prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "cost",
        ]
    )  # fmt: skip
    last = 0
    while True:
        rows = await db.fetchall(
            "SELECT u.id, u.finished, u.started, k.name, k.prefix, u.model, u.status, "
            "u.prompt_tokens, u.completion_tokens, u.reasoning_tokens, u.cached_tokens, u.cost "
            "FROM usage_events u LEFT JOIN keys k ON k.id = u.key_id "
            "WHERE u.id > ? AND u.finished >= ? ORDER BY u.id LIMIT ?",
            (last, since, _CSV_BATCH),
        )
        for r in rows:
            cost = format_credits(r[11])
            writer.writerow([_cell(v) for v in (*tuple(r)[:11], f"{cost:f}")])
        yield out.getvalue()
        out.seek(0)
        out.truncate()
        if len(rows) < _CSV_BATCH:
            return
        last = rows[-1][0]


@get("/usage.csv")
async def usage_csv(request: Request[Any, Any, Any], period: str = "7d") -> Stream:
    now = datetime.now(UTC)
    start = period_start(period, now)
    filename = f"usage-{period}-{now.strftime('%Y%m%d-%H%M')}.csv"
    return Stream(
        _csv_rows(services(request).db, _iso(start) if start else ""),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


ROUTES = [usage_page, usage_csv]
