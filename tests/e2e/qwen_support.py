"""A real appliance server (subprocess, loopback) over the tiny Qwen 3.5 GGUFs, SmolLM2 and
(when installed) Qwen2.5-Coder-0.5B, plus helpers to read OpenAI streams the SDK way."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.models import qwen_coder_path
from tests.support.tiny_qwen35 import write_tiny_qwen35

__all__ = [
    "QWEN_CODER",
    "SMOLLM2",
    "TINY_DENSE",
    "TINY_MOE",
    "RunningServer",
    "StreamResult",
    "accumulate_stream",
    "dump",
    "running_server",
]

TINY_MOE = "tiny-qwen35moe"
TINY_DENSE = "tiny-qwen35"
SMOLLM2 = "smollm2-135m-instruct.q4_1"
QWEN_CODER = "qwen2.5-coder-0.5b-instruct-q4_k_m"

_STARTUP_TIMEOUT_S = 120.0


@dataclass
class RunningServer:
    base_url: str
    api_key: str
    log_path: Path
    models_dir: Path
    has_qwen_coder: bool

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _appliance(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _health(base_url: str) -> int:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def running_server(root: Path, *, ctx_size: int = 4096) -> Iterator[RunningServer]:
    """Start ``python -m appliance serve`` on loopback with every test model in one dir."""
    data_dir, models_dir = root / "data", root / "models"
    models_dir.mkdir(parents=True)
    write_tiny_qwen35(models_dir / f"{TINY_MOE}.gguf", moe=True)
    write_tiny_qwen35(models_dir / f"{TINY_DENSE}.gguf", moe=False)
    coder = qwen_coder_path()
    if coder is not None:
        (models_dir / coder.name).symlink_to(coder)
    env = _clean_env()
    created = _appliance("keys", "create", "qwen-fidelity", "--data-dir", str(data_dir), env=env)
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip().splitlines()[-1]
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "appliance", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--models-dir", str(models_dir),
        "--threads", "1", "--ctx-size", str(ctx_size), "--parallel", "2",
        "--default-model", TINY_MOE,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(base_url, api_key, log_path, models_dir, coder is not None)
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while _health(base_url) != 200:
            if process.poll() is not None:
                raise AssertionError(f"the server exited early:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not become healthy:\n{server.log_tail()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class StreamResult:
    """A stream folded back into one message, the way the OpenAI SDK docs accumulate deltas."""

    chunks: list[dict[str, Any]]
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    roles: list[str] = field(default_factory=list)


def accumulate_stream(chunks: Iterable[dict[str, Any]]) -> StreamResult:
    """Fold chunk dicts (``chunk.model_dump(exclude_unset=True)``) into a StreamResult."""
    result = StreamResult(chunks=list(chunks))
    calls: dict[int, dict[str, Any]] = {}
    for chunk in result.chunks:
        if chunk.get("usage"):
            result.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get("role"):
                result.roles.append(delta["role"])
            result.content += delta.get("content") or ""
            result.reasoning += delta.get("reasoning_content") or ""
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(
                    piece["index"],
                    {"id": None, "type": None, "function": {"name": "", "arguments": ""}},
                )
                if piece.get("id"):
                    call["id"] = piece["id"]
                if piece.get("type"):
                    call["type"] = piece["type"]
                function = piece.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                result.finish_reason = choice["finish_reason"]
    result.tool_calls = [calls[i] for i in sorted(calls)]
    return result


def dump(obj: Any) -> str:
    """Pretty JSON for transcripts."""
    return json.dumps(obj, indent=2, ensure_ascii=False)
