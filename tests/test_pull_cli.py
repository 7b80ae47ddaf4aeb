"""``appliance models pull URL``: a real download from a loopback server, with progress,
checksum, resume after Ctrl-C, and one-line errors."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.admin.pulls import Pull
from appliance.pull_cli import format_progress
from tests.admin.range_server import RangeServer
from tests.support.tiny_qwen35 import write_tiny_qwen35


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    return write_tiny_qwen35(tmp_path / "served" / "Tiny-Pulled.gguf", moe=True)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_pull_with_progress_checksum_and_a_dropped_connection(gguf: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    # ~2 s at 200 kB/s, and the first response is cut after 100 kB (the pull resumes).
    with RangeServer(gguf, rate=200_000, drop_after=100_000) as server:
        result = _cli("models", "pull", server.url, "--sha256", digest, "--models-dir", str(models))
        ranges = list(server.ranges)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "tiny-pulled"
    assert (models / "Tiny-Pulled.gguf").read_bytes() == gguf.read_bytes()
    assert not list(models.glob("*.part"))
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    bars = [line for line in result.stderr.splitlines() if line.startswith("Tiny-Pulled.gguf  [")]
    assert len(bars) >= 3, result.stderr  # a line per 10 % when stderr is not a terminal
    assert "100 %" in bars[-1] and "441.0 KB of 441.0 KB" in bars[-1]
    assert "Tiny-Pulled.gguf: 441.0 KB in" in result.stderr
    listed = _cli("models", "list", "--json", "--models-dir", str(models))
    assert "tiny-pulled" in {m["id"] for m in json.loads(listed.stdout)}


def test_wrong_checksum_is_one_line_and_leaves_nothing(gguf: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    with RangeServer(gguf) as server:
        result = _cli(
            "models", "pull", server.url, "--sha256", "0" * 64, "--models-dir", str(models)
        )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("appliance: error:")]
    assert len(errors) == 1 and "SHA-256" in errors[0].upper(), result.stderr
    assert not (models / "Tiny-Pulled.gguf").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [("ftp://example.invalid/x.gguf", "http"), ("http://127.0.0.1:9/model.bin", ".gguf")],
)
def test_bad_urls_are_refused(tmp_path: Path, url: str, message: str) -> None:
    result = _cli("models", "pull", url, "--models-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_ctrl_c_keeps_the_part_file_and_the_next_run_resumes(gguf: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    part = models / "Tiny-Pulled.gguf.part"
    with RangeServer(gguf, rate=60_000) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "models", "pull", server.url, "--models-dir",
             str(models)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not part.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no .part file"
            time.sleep(0.05)
        time.sleep(1.5)  # ~90 kB of 441 kB arrive (held in memory until written)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stderr
        assert "run the same command again to resume" in stderr
        kept = part.stat().st_size
        assert 0 < kept < gguf.stat().st_size
        server.rate = 0
        again = _cli("models", "pull", server.url, "--models-dir", str(models))
        assert again.returncode == 0, again.stderr
        assert server.ranges[-1] == f"bytes={kept}-"
    assert (models / "Tiny-Pulled.gguf").read_bytes() == gguf.read_bytes()


def test_progress_line_shows_bar_bytes_speed_and_eta() -> None:
    pull = Pull(id="x", url="http://h/m.gguf", filename="m.gguf", dest=Path("/tmp/m.gguf"))
    pull.total, pull.received = 1_000_000, 0
    pull._sample()
    time.sleep(0.3)
    pull.received = 250_000
    pull._sample()
    line = format_progress(pull)
    assert line.startswith("m.gguf  [######")
    assert " 25 %" in line and "250.0 KB of 1.0 MB" in line
    assert "KB/s" in line and "ETA 0:0" in line
    assert io.StringIO().isatty() is False  # the non-terminal path the CLI tests exercise
