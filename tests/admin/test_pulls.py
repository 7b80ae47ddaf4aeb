"""Pulling models: download, resume, verify, cancel; and the pull endpoints in-process."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from pathlib import Path

import pytest

from appliance.admin.pulls import Pull, PullError, PullManager
from tests.admin.conftest import AdminClient
from tests.admin.range_server import RangeServer
from tests.support.tiny_qwen35 import write_tiny_qwen35

pytestmark = pytest.mark.anyio


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    source = tmp_path / "served"
    source.mkdir()
    return write_tiny_qwen35(source / "Pulled-Model.gguf", moe=True)


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    return tmp_path / "models"


async def _finish(pull: Pull, timeout: float = 20.0) -> Pull:
    assert pull.task is not None
    await asyncio.wait_for(asyncio.shield(pull.task), timeout)
    return pull


async def test_pull_downloads_verifies_and_renames(gguf: Path, models_dir: Path) -> None:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    manager = PullManager(models_dir)
    try:
        with RangeServer(gguf) as server:
            pull = await _finish(manager.start(server.url, sha256=digest.upper()))
        assert pull.status == "done", pull.error
        assert (models_dir / "Pulled-Model.gguf").read_bytes() == gguf.read_bytes()
        assert not pull.part.exists()
        assert pull.model_id == "pulled-model"
        assert pull.fraction == 1.0 and pull.received == gguf.stat().st_size
        with pytest.raises(PullError, match="already in the models directory"):
            manager.start(server.url)
    finally:
        await manager.close()


async def test_pull_resumes_after_a_dropped_connection(gguf: Path, models_dir: Path) -> None:
    manager = PullManager(models_dir)
    try:
        with RangeServer(gguf, drop_after=100_000) as server:
            pull = await _finish(manager.start(server.url))
        assert pull.status == "done", pull.error
        assert server.ranges[0] is None and server.ranges[1] == "bytes=100000-"
        assert pull.resumed_from == 100_000
        assert (models_dir / gguf.name).read_bytes() == gguf.read_bytes()
    finally:
        await manager.close()


async def test_pull_resumes_a_part_file_left_by_a_restart(gguf: Path, models_dir: Path) -> None:
    models_dir.mkdir()
    data = gguf.read_bytes()
    (models_dir / (gguf.name + ".part")).write_bytes(data[: len(data) // 2])
    manager = PullManager(models_dir)
    try:
        digest = hashlib.sha256(data).hexdigest()
        with RangeServer(gguf) as server:
            pull = await _finish(manager.start(server.url, sha256=digest))
        assert pull.status == "done", pull.error
        assert server.ranges == [f"bytes={len(data) // 2}-"]
        assert (models_dir / gguf.name).read_bytes() == data
    finally:
        await manager.close()


async def test_a_server_ignoring_range_starts_over(gguf: Path, models_dir: Path) -> None:
    models_dir.mkdir()
    (models_dir / (gguf.name + ".part")).write_bytes(b"garbage" * 1000)
    manager = PullManager(models_dir)
    try:
        with RangeServer(gguf, ignore_range=True) as server:
            pull = await _finish(manager.start(server.url))
        assert pull.status == "done", pull.error
        assert (models_dir / gguf.name).read_bytes() == gguf.read_bytes()
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("server_kwargs", "sha256", "message"),
    [
        ({}, "0" * 64, "SHA-256 mismatch"),
        ({"status": 404}, "", "HTTP 404"),
    ],
)
async def test_failed_pulls_say_why(
    gguf: Path, models_dir: Path, server_kwargs: dict[str, int], sha256: str, message: str
) -> None:
    manager = PullManager(models_dir)
    try:
        with RangeServer(gguf, **server_kwargs) as server:  # type: ignore[arg-type]
            pull = await _finish(manager.start(server.url, sha256=sha256))
        assert pull.status == "failed" and message in pull.error
        assert not (models_dir / gguf.name).exists()
    finally:
        await manager.close()


async def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path, models_dir: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>not a model</html>" * 100)
    manager = PullManager(models_dir)
    try:
        with RangeServer(fake) as server:
            pull = await _finish(manager.start(server.url))
        assert pull.status == "failed" and "not a GGUF" in pull.error
        assert not pull.part.exists() and not pull.dest.exists()
    finally:
        await manager.close()


async def test_cancel_stops_and_removes_the_part(gguf: Path, models_dir: Path) -> None:
    manager = PullManager(models_dir)
    try:
        with RangeServer(gguf, rate=100_000) as server:
            pull = manager.start(server.url)
            deadline = time.monotonic() + 10
            while pull.received < 40_000 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert 0 < pull.received < gguf.stat().st_size
            assert pull.speed > 0 and pull.eta is not None
            await manager.cancel(pull.id)
        assert pull.status == "cancelled"
        assert not pull.part.exists() and not pull.dest.exists()
        manager.dismiss(pull.id)
        assert manager.list() == []
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("url", "filename", "message"),
    [
        ("file:///etc/passwd", "", "Only http"),
        ("http://h/model.gguf", "../evil.gguf", "not a usable file name"),
        ("http://h/model.gguf", "x.bin", "must end with .gguf"),
        ("http://h/", "", "must end with .gguf"),
    ],
)
async def test_bad_pull_requests(models_dir: Path, url: str, filename: str, message: str) -> None:
    with pytest.raises(PullError, match=message):
        PullManager(models_dir).start(url, filename=filename)


def test_pull_through_the_admin_page(admin: AdminClient, gguf: Path) -> None:
    with RangeServer(gguf, rate=400_000) as server:
        started = admin.post("/admin/pulls", {"url": server.url + "?download=true"})
        assert started.status_code == 200, started.text
        pull_id = re.search(r'id="pull-([0-9a-f]{8})"', started.text).group(1)  # type: ignore[union-attr]
        assert 'hx-trigger="every 1s"' in started.text
        seen_progress, deadline = False, time.monotonic() + 20
        while time.monotonic() < deadline:
            poll = admin.http.get(f"/admin/pulls/{pull_id}", headers={"HX-Request": "true"})
            assert poll.status_code == 200
            if "<progress" in poll.text and re.search(r'value="(?!0\.0")[\d.]+"', poll.text):
                seen_progress = True
            if "Added as" in poll.text:
                break
            time.sleep(0.2)
        assert "Added as <code>pulled-model</code>" in poll.text
        assert poll.headers["hx-trigger-after-settle"] == "models-changed"
        assert 'hx-trigger="every 1s"' not in poll.text  # polling stops when done
        assert seen_progress
    models = admin.http.get("/admin/models").text
    assert 'data-model="pulled-model"' in models
