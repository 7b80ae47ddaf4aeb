"""Pull a GGUF from a URL into the models directory, in the background.

Each pull is an asyncio task streaming with ``httpx.AsyncClient`` into ``<name>.gguf.part``;
disk writes and hashing run in a worker thread, so the event loop only moves bytes around.
An interrupted pull (a dropped connection, a restart of the server) resumes with an HTTP
``Range`` request from the size of the ``.part`` file. When all bytes are there the file is
checked (size, optional sha256, the GGUF magic) and renamed into place, where the model
registry finds it on its next scan. Cancelling deletes the ``.part`` file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import unquote, urlsplit

import httpx

from appliance.engine.registry import model_id_for

__all__ = ["Pull", "PullError", "PullManager"]

_log = logging.getLogger(__name__)

Status = Literal["running", "done", "failed", "cancelled"]
_CHUNK = 1 << 20  # bytes handed to the writer thread at once
_RETRIES = 5
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.gguf$", re.IGNORECASE)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class PullError(ValueError):
    """A pull that cannot start (bad URL, name, checksum, a clash); shown to the owner."""


@dataclass(slots=True)
class Pull:
    id: str
    url: str
    filename: str
    dest: Path
    sha256: str = ""
    status: Status = "running"
    error: str = ""
    received: int = 0
    total: int | None = None
    resumed_from: int = 0
    phase: str = "downloading"
    """downloading, then verifying (size, magic, checksum) before the rename."""
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))
    task: asyncio.Task[None] | None = None

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def model_id(self) -> str:
        return model_id_for(self.dest)

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return 1.0 if self.status == "done" else None
        return min(1.0, self.received / self.total)

    @property
    def speed(self) -> float:
        """Bytes per second over the last few seconds."""
        if self.status != "running" or len(self._samples) < 2:
            return 0.0
        now = time.monotonic()
        recent = [s for s in self._samples if now - s[0] <= 5.0] or [self._samples[-1]]
        first, last = recent[0], self._samples[-1]
        elapsed = now - first[0]
        return (last[1] - first[1]) / elapsed if elapsed > 0.2 else 0.0

    @property
    def eta(self) -> float | None:
        speed = self.speed
        if self.total is None or speed <= 0:
            return None
        return max(0.0, (self.total - self.received) / speed)

    def _sample(self) -> None:
        self._samples.append((time.monotonic(), self.received))


def _filename_for(url: str, override: str) -> str:
    name = override.strip() or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if not name.lower().endswith(".gguf"):
        raise PullError(f"The file name must end with .gguf (got '{name or 'nothing'}')")
    if not _NAME.match(name) or ".." in name:
        raise PullError(f"'{name}' is not a usable file name: use letters, digits and . _ + - only")
    return name


def _check_url(url: str) -> str:
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PullError("Only http:// and https:// URLs can be pulled")
    return url


class PullManager:
    """Starts, tracks, resumes and cancels pulls; lives on ``Services.pulls``."""

    def __init__(self, models_dir: Path, *, keep: int = 20) -> None:
        self.models_dir = models_dir
        self.keep = keep
        self._pulls: dict[str, Pull] = {}
        self._client: httpx.AsyncClient | None = None

    def list(self) -> list[Pull]:
        return list(self._pulls.values())

    def get(self, pull_id: str) -> Pull | None:
        return self._pulls.get(pull_id)

    def start(self, url: str, *, filename: str = "", sha256: str = "") -> Pull:
        url = _check_url(url)
        name = _filename_for(url, filename)
        sha256 = sha256.strip().lower()
        if sha256 and not _SHA256.match(sha256):
            raise PullError("A SHA-256 checksum is 64 hexadecimal characters")
        dest = self.models_dir / name
        if dest.exists():
            raise PullError(f"{name} is already in the models directory")
        for other in self._pulls.values():
            if other.status == "running" and other.dest.name.lower() == name.lower():
                raise PullError(f"{name} is already being pulled")
        pull = Pull(id=secrets.token_hex(4), url=url, filename=name, dest=dest, sha256=sha256)
        self._launch(pull)
        self._pulls[pull.id] = pull
        self._prune()
        return pull

    def retry(self, pull_id: str) -> Pull:
        pull = self._pulls.get(pull_id)
        if pull is None:
            raise PullError("That pull no longer exists")
        if pull.status in ("running", "done"):
            return pull
        pull.status, pull.error, pull.finished, pull.phase = "running", "", None, "downloading"
        pull.started = time.monotonic()
        pull._samples.clear()
        self._launch(pull)
        return pull

    async def cancel(self, pull_id: str) -> Pull | None:
        pull = self._pulls.get(pull_id)
        if pull is None:
            return None
        if pull.task is not None and not pull.task.done():
            pull.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pull.task
        if pull.status != "done":
            pull.status, pull.finished = "cancelled", time.monotonic()
            pull.part.unlink(missing_ok=True)
        return pull

    def dismiss(self, pull_id: str) -> None:
        pull = self._pulls.get(pull_id)
        if pull is not None and pull.status != "running":
            del self._pulls[pull_id]

    async def close(self) -> None:
        """Stop every pull (their .part files stay, to resume later) and the HTTP client."""
        tasks = [p.task for p in self._pulls.values() if p.task and not p.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- internals -------------------------------------------------------------------------
    def _launch(self, pull: Pull) -> None:
        pull.task = asyncio.create_task(self._run(pull), name=f"pull {pull.filename}")

    def _prune(self) -> None:
        finished = [p for p in self._pulls.values() if p.status != "running"]
        for pull in finished[: max(0, len(self._pulls) - self.keep)]:
            del self._pulls[pull.id]

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True,
                timeout=httpx.Timeout(30.0, read=60.0),
                headers={"User-Agent": "appliance-model-pull/1"},
            )
        return self._client

    async def _run(self, pull: Pull) -> None:
        try:
            for attempt in range(_RETRIES + 1):
                try:
                    await self._download(pull)
                    break
                except (httpx.TransportError, _Retry) as exc:
                    if attempt == _RETRIES:
                        raise PullError(f"Download interrupted: {exc}") from exc
                    _log.info("pull %s interrupted (%s); resuming", pull.filename, exc)
                    await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
            pull.phase = "verifying"
            await asyncio.to_thread(self._finish, pull)
            pull.status = "done"
        except asyncio.CancelledError:
            if pull.status == "running":
                pull.status = "cancelled"
            raise
        except (PullError, httpx.HTTPError, OSError) as exc:
            pull.status, pull.error = "failed", str(exc) or type(exc).__name__
            _log.warning("pull of %s failed: %s", pull.url, pull.error)
        finally:
            pull.finished = time.monotonic()

    async def _download(self, pull: Pull) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        have = pull.part.stat().st_size if pull.part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with self._http().stream("GET", pull.url, headers=headers) as response:
            if response.status_code == 416 and have:
                # The .part may already be complete; the size check in _finish decides.
                pull.total = pull.received = have
                return
            if response.status_code not in (200, 206):
                raise PullError(f"The server answered HTTP {response.status_code}")
            offset = _resume_offset(response, have)
            length = response.headers.get("content-length")
            pull.total = offset + int(length) if length and length.isdigit() else None
            self._check_space(pull, offset)
            pull.received = pull.resumed_from = offset
            pull._sample()
            with pull.part.open("r+b" if offset else "wb") as out:
                out.truncate(offset)
                out.seek(offset)
                buffer = bytearray()
                last_sample = time.monotonic()
                try:
                    async for chunk in response.aiter_bytes():
                        buffer += chunk
                        pull.received += len(chunk)
                        if len(buffer) >= _CHUNK:
                            await asyncio.to_thread(_write, out, bytes(buffer))
                            buffer.clear()
                        if time.monotonic() - last_sample >= 0.25:
                            pull._sample()
                            last_sample = time.monotonic()
                finally:
                    # What arrived before a failure is good data: keep it for the resume.
                    out.write(buffer)
                    out.flush()
                    pull.received = out.tell()
                await asyncio.to_thread(_write, out, b"", True)
            pull._sample()
        if pull.total is not None and pull.received < pull.total:
            raise _Retry(f"{pull.received} of {pull.total} bytes arrived")

    def _check_space(self, pull: Pull, offset: int) -> None:
        if pull.total is None:
            return
        free = shutil.disk_usage(self.models_dir).free
        if pull.total - offset > free:
            raise PullError(
                f"Not enough disk space: {pull.total - offset} bytes needed, {free} free"
            )

    def _finish(self, pull: Pull) -> None:
        """Verify the finished .part (size, magic, checksum) and move it into place."""
        size = pull.part.stat().st_size
        if pull.total is not None and size != pull.total:
            raise PullError(f"Size mismatch: got {size} bytes, expected {pull.total}")
        with pull.part.open("rb") as f:
            if f.read(4) != b"GGUF":
                pull.part.unlink(missing_ok=True)
                raise PullError("The downloaded file is not a GGUF model")
            if pull.sha256:
                f.seek(0)
                digest = hashlib.file_digest(f, "sha256").hexdigest()
                if digest != pull.sha256:
                    pull.part.unlink(missing_ok=True)
                    raise PullError(f"SHA-256 mismatch: the file has {digest}")
        if pull.dest.exists():
            raise PullError(f"{pull.filename} appeared in the models directory meanwhile")
        os.replace(pull.part, pull.dest)
        pull.received = pull.total = size


class _Retry(Exception):
    """The body ended early; try again from where it stopped."""


def _resume_offset(response: httpx.Response, have: int) -> int:
    """Where the body starts in the file: ``have`` for a matching 206, else 0."""
    if response.status_code != 206:
        return 0  # the server ignored Range: start over
    match = re.match(r"bytes (\d+)-", response.headers.get("content-range", ""))
    if match is None or int(match.group(1)) != have:
        raise PullError("The server resumed at the wrong offset")
    return have


def _write(out: BinaryIO, data: bytes, sync: bool = False) -> None:
    out.write(data)
    if sync:
        out.flush()
        os.fsync(out.fileno())
