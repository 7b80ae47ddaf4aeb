"""Real-process helpers for the ecosystem e2e tests: an appliance server on loopback, and
Open WebUI (installed the slim way into its own cached venv) pointed at it.

Open WebUI is never installed into the project's venv: its pins (fastapi, pydantic, openai,
...) would fight ours. ``ensure_openwebui_venv`` builds ``<cache>/openwebui-venv`` once:

1. ``pip install --no-deps open-webui==OPENWEBUI_VERSION`` (the wheel is ~100 MB: the
   built frontend is inside it);
2. ``pip install -r <site-packages>/requirements-slim.txt`` — the slim requirement set that
   the wheel itself ships at the top of its purelib (the one the project's ``slim`` image
   uses: no torch, sentence-transformers, chromadb or playwright).

A ``.ready`` stamp marks a finished install, so an interrupted one is redone.
``python -m tests.e2e.openwebui_support`` does the same from the command line (``.ci/run``
calls it before the test run so the test itself only starts the server).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support.models import cache_dir

__all__ = [
    "OPENWEBUI_VERSION",
    "ApplianceServer",
    "OpenWebUI",
    "OpenWebUIUnavailable",
    "appliance_server",
    "ensure_openwebui_venv",
    "free_port",
    "http_json",
    "openwebui_server",
    "run_appliance",
]

OPENWEBUI_VERSION = "0.12.4"
"""The Open WebUI release the test drives (pinned: its REST API moves between releases)."""

_STARTUP_TIMEOUT_S = 180.0
_OPENWEBUI_STARTUP_TIMEOUT_S = 300.0
_PIP_TIMEOUT_S = 1800.0


class OpenWebUIUnavailable(RuntimeError):
    """Open WebUI's venv could not be created (no registry access, unsupported Python)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def http_json(
    method: str,
    url: str,
    body: Any = None,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 120.0,
) -> tuple[int, Any]:
    """One JSON request with the standard library: (status, decoded body or raw text)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        status, raw = int(exc.code), exc.read()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def run_appliance(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS`` with a clean environment."""
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=timeout,
        check=False,
    )


def _status(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return int(response.status), response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode(errors="replace")
    except OSError:
        return 0, ""


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class ApplianceServer:
    base_url: str
    api_key: str
    key_name: str
    data_dir: Path
    models_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    health_seen: list[tuple[int, str]] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def keys(self) -> dict[str, dict[str, Any]]:
        """``appliance keys list --json``, by key name."""
        done = run_appliance("keys", "list", "--json", "--data-dir", str(self.data_dir))
        assert done.returncode == 0, done.stderr
        return {row["name"]: row for row in json.loads(done.stdout)}

    def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
        return http_json("POST", self.base_url + path, body, headers=self.auth, **kwargs)


@contextlib.contextmanager
def appliance_server(
    root: Path,
    models: Mapping[str, Path],
    *,
    key_name: str = "ecosystem",
    default_model: str = "",
    extra_args: Sequence[str] = (),
    ctx_size: int = 1024,
) -> Iterator[ApplianceServer]:
    """``python -m appliance serve`` on a free loopback port; yields once /health is 200.

    ``models`` maps file names in the models dir to GGUF paths (symlinked). The key is made
    with ``python -m appliance keys create`` (its last stdout line). Every /health answer
    seen while waiting is kept in ``health_seen``.
    """
    data_dir, models_dir = root / "data", root / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    for name, path in models.items():
        target = models_dir / name
        if not target.exists():
            target.symlink_to(path.resolve())
    created = run_appliance("keys", "create", key_name, "--data-dir", str(data_dir))
    assert created.returncode == 0, created.stderr
    api_key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable, "-m", "appliance", "serve",
        "--host", "127.0.0.1", "--port", str(port),
        "--data-dir", str(data_dir), "--models-dir", str(models_dir),
        "--threads", "1", "--ctx-size", str(ctx_size), "--parallel", "2",
        *(("--default-model", default_model) if default_model else ()),
        *extra_args,
    ]  # fmt: skip
    log_path = root / "appliance.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
    server = ApplianceServer(
        base_url, api_key, key_name, data_dir, models_dir, log_path, process
    )
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while True:
            seen = _status(f"{base_url}/health")
            if seen[0]:
                server.health_seen.append(seen)
            if seen[0] == 200:
                break
            if process.poll() is not None:
                raise AssertionError(f"the appliance exited early:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the appliance did not become healthy:\n{server.log_tail()}")
            time.sleep(0.02)
        yield server
    finally:
        _stop(process)


# -- Open WebUI ---------------------------------------------------------------------------


def openwebui_venv_dir() -> Path:
    return cache_dir() / "openwebui-venv"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _purelib(python: Path) -> Path:
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip())


def _pip(python: Path, *args: str, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ pip {' '.join(args)}\n".encode())
        out.flush()
        done = subprocess.run(
            [str(python), "-m", "pip", "--disable-pip-version-check", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=_PIP_TIMEOUT_S,
            check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise OpenWebUIUnavailable(f"pip {' '.join(args[:3])} failed:\n{tail}")


def ensure_openwebui_venv(venv: Path | None = None) -> Path:
    """Open WebUI's own venv (built once, the slim way); returns its ``open-webui`` script.

    Raises ``OpenWebUIUnavailable`` when it cannot be built (no registry, no Python 3.11/3.12).
    """
    venv = venv or openwebui_venv_dir()
    script = venv / "bin" / "open-webui"
    stamp = venv / ".ready"
    if stamp.is_file() and stamp.read_text().strip() == OPENWEBUI_VERSION and script.exists():
        return script
    if sys.version_info[:2] not in ((3, 11), (3, 12)):
        raise OpenWebUIUnavailable(f"Open WebUI needs Python 3.11 or 3.12, not {sys.version}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "openwebui-install.log"
    log.write_text("")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = _venv_python(venv)
    _pip(python, "install", "--no-deps", f"open-webui=={OPENWEBUI_VERSION}", log=log)
    requirements = _purelib(python) / "requirements-slim.txt"
    if not requirements.is_file():
        raise OpenWebUIUnavailable(f"open-webui {OPENWEBUI_VERSION} ships no {requirements.name}")
    _pip(python, "install", "-r", str(requirements), log=log)
    if not script.exists():
        raise OpenWebUIUnavailable(f"no {script} after the install")
    stamp.write_text(OPENWEBUI_VERSION + "\n")
    return script


def openwebui_env(data_dir: Path, base_url: str, api_key: str) -> dict[str, str]:
    """Everything that keeps Open WebUI off the network and on our server."""
    env = _clean_env()
    env.update(
        {
            "DATA_DIR": str(data_dir),
            "OFFLINE_MODE": "true",  # no version check, no model auto-updates
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "USE_SLIM_DOCKER": "true",  # no local embedding / whisper / vector DB stack
            "WEBUI_AUTH": "False",  # single-user mode: signin makes admin@localhost
            "WEBUI_SECRET_KEY": "appliance-e2e-secret",
            "ENABLE_OLLAMA_API": "false",
            "ENABLE_OPENAI_API": "true",
            "OPENAI_API_BASE_URL": f"{base_url}/v1",
            "OPENAI_API_KEY": api_key,
            # RAG: no embedding model download (slim has no sentence-transformers anyway).
            "BYPASS_EMBEDDING_AND_RETRIEVAL": "true",
            "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
            "RAG_RERANKING_MODEL_AUTO_UPDATE": "false",
            "ENABLE_WEB_SEARCH": "false",
            "ENABLE_VERSION_UPDATE_CHECK": "false",
            "ENABLE_COMMUNITY_SHARING": "false",
            "ENABLE_IMAGE_GENERATION": "false",
            "ENABLE_CODE_INTERPRETER": "false",
            "ANONYMIZED_TELEMETRY": "false",
            "SCARF_NO_ANALYTICS": "true",
            "DO_NOT_TRACK": "true",
            "ENABLE_OTEL": "false",
            "GLOBAL_LOG_LEVEL": "INFO",
        }
    )
    return env


@dataclass
class OpenWebUI:
    base_url: str
    log_path: Path
    process: subprocess.Popen[bytes]
    token: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return http_json("GET", self.base_url + path, headers=self.auth, **kwargs)

    def post(self, path: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
        return http_json("POST", self.base_url + path, body, headers=self.auth, **kwargs)


@contextlib.contextmanager
def openwebui_server(
    script: Path,
    root: Path,
    appliance: ApplianceServer,
    *,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[OpenWebUI]:
    """``open-webui serve`` on a free loopback port, talking to ``appliance``."""
    data_dir = root / "openwebui-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    log_path = root / "openwebui.log"
    env = openwebui_env(data_dir, appliance.base_url, appliance.api_key)
    env.update(extra_env or {})
    command = [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root)
        )
    webui = OpenWebUI(base_url, log_path, process)
    try:
        deadline = time.monotonic() + _OPENWEBUI_STARTUP_TIMEOUT_S
        while _status(f"{base_url}/health")[0] != 200:
            if process.poll() is not None:
                raise AssertionError(f"Open WebUI exited early:\n{webui.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"Open WebUI did not become healthy:\n{webui.log_tail()}")
            time.sleep(0.5)
        yield webui
    finally:
        _stop(process)


def _main() -> int:
    try:
        script = ensure_openwebui_venv()
    except (OpenWebUIUnavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"Open WebUI venv not built: {exc}", file=sys.stderr)
        return 1
    print(f"Open WebUI {OPENWEBUI_VERSION} ready: {script}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
