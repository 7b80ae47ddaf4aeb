"""A real appliance server for the billing e2e tests: start, SIGKILL, restart on the same data
dir; the CLI; reading the database read-only; SSE streams read chunk by chunk; costs in Decimal.

SmolLM2-135M (embedded; the models dir is empty) with ``--threads 1 --ctx-size 1024
--parallel 4``. stdout and stderr go to a log file that tests search for leaked secrets.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 120.0
PRICE_IN = Decimal("0.30")  # credits per 1M prompt tokens (the defaults)
PRICE_OUT = Decimal("0.90")
MILLION = Decimal(1_000_000)

__all__ = [
    "BillingServer",
    "cost",
    "credits_text",
    "open_stream",
]


def cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    """What a request costs at the default prices (exact at these prices: whole nanos)."""
    return (prompt_tokens * PRICE_IN + completion_tokens * PRICE_OUT) / MILLION


def credits_text(value: Decimal) -> str:
    """A Decimal as the plain digits the CLI accepts."""
    return format(value, "f")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class BillingServer:
    root: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    plaintext_keys: list[str] = field(default_factory=list)
    """Every key the tests created, to look for in logs, files and listings."""

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "appliance.db"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_path(self, start: int) -> Path:
        return self.root / f"server-{start}.log"

    def log(self) -> str:
        """stdout + stderr of every start so far."""
        return "".join(
            self.log_path(i).read_text(errors="replace") for i in range(1, self.starts + 1)
        )

    # -- process -------------------------------------------------------------------------------
    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with self.log_path(self.starts).open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "appliance", "serve",
                    "--host", "127.0.0.1", "--port", str(self.port),
                    "--data-dir", str(self.data_dir),
                    "--models-dir", str(self.models_dir),
                    "--threads", "1", "--ctx-size", "1024", "--parallel", "4",
                ],
                cwd=ROOT, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited early:\n{self.log()[-4000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become healthy:\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a power cut of the process."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise

    # -- CLI -----------------------------------------------------------------------------------
    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args, "--data-dir", str(self.data_dir)],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create_key(self, name: str, *flags: str) -> str:
        result = self.cli("keys", "create", name, *flags)
        assert result.returncode == 0, result.stderr
        key = result.stdout.strip().splitlines()[-1]
        self.plaintext_keys.append(key)
        return key

    def keys(self) -> dict[str, dict[str, Any]]:
        """``keys list --json`` by name, with credit amounts as exact Decimals."""
        result = self.cli("keys", "list", "--json")
        assert result.returncode == 0, result.stderr
        listed = json.loads(result.stdout, parse_float=Decimal, parse_int=Decimal)
        out = {}
        for k in listed:
            for name in ("requests", "prompt_tokens", "completion_tokens"):
                k[name] = int(k[name])
            out[k["name"]] = k
        return out

    def wait_settled(self, name: str, requests: int, timeout: float = 30) -> dict[str, Any]:
        """Settlement runs after the response: wait until the key shows every request."""
        deadline = time.monotonic() + timeout
        while True:
            key = self.keys()[name]
            if key["requests"] >= requests and key["reserved"] == 0:
                return key
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not settled: {key}")
            time.sleep(0.1)

    # -- database (read-only while the server writes) ------------------------------------------
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            return list(conn.execute(sql, params).fetchall())

    def usage_events(self, name: str) -> list[sqlite3.Row]:
        return self.query(
            "SELECT u.* FROM usage_events u JOIN keys k ON k.id = u.key_id WHERE k.name = ? "
            "ORDER BY u.id",
            (name,),
        )

    # -- HTTP ----------------------------------------------------------------------------------
    def chat(
        self, client: httpx.Client, key: str, content: str, max_tokens: int, **extra: Any
    ) -> httpx.Response:
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }
        return client.post(
            self.base_url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        )


@dataclass
class OpenStream:
    """A streaming response read one SSE event at a time."""

    response: httpx.Response
    lines: Iterator[str]
    chunks: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False

    def next_chunk(self) -> dict[str, Any] | None:
        for line in self.lines:
            if not line.strip():
                continue
            assert line.startswith("data: "), line
            payload = line[len("data: ") :]
            if payload == "[DONE]":
                self.done = True
                return None
            chunk: dict[str, Any] = json.loads(payload)
            assert "error" not in chunk, chunk
            self.chunks.append(chunk)
            return chunk
        return None

    def content_chunks(self) -> int:
        return sum(
            1 for c in self.chunks if c.get("choices") and c["choices"][0]["delta"].get("content")
        )

    def read_content_chunks(self, n: int) -> None:
        while self.content_chunks() < n:
            if self.next_chunk() is None:
                raise AssertionError(f"the stream ended after {self.content_chunks()} chunks")

    def read_to_end(self) -> dict[str, Any] | None:
        """Read everything; return the usage chunk (stream_options.include_usage)."""
        while self.next_chunk() is not None:
            pass
        assert self.done
        usage = [c["usage"] for c in self.chunks if c.get("usage")]
        return usage[-1] if usage else None


def open_stream(
    server: BillingServer, client: httpx.Client, key: str, content: str, max_tokens: int
) -> OpenStream:
    """Start a streaming chat completion (with usage); the caller must close ``response``."""
    request = client.build_request(
        "POST",
        server.base_url + "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": f"Bearer {key}"},
    )
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    return OpenStream(response, response.iter_lines())
