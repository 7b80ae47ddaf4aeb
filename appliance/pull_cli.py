"""``appliance models pull URL``: download a GGUF into the models directory with a progress bar.

The same PullManager as the admin page's pull form (resume with HTTP Range from the ``.part``
file, optional sha256, GGUF magic check); here the progress goes to stderr: a bar redrawn in
place on a terminal, a line per 10 % otherwise (logs, CI). Ctrl-C keeps the ``.part`` file,
so running the same command again resumes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

from appliance.admin.pulls import Pull, PullError, PullManager
from appliance.admin.views import duration, human_bytes

__all__ = ["format_progress", "pull_model"]

_BAR = 24


def format_progress(pull: Pull) -> str:
    """One line: name, bar, percent, bytes, speed, ETA (what is known so far)."""
    fraction = pull.fraction
    parts = [pull.filename]
    if fraction is not None:
        filled = int(fraction * _BAR)
        parts.append("[" + "#" * filled + "-" * (_BAR - filled) + f"] {fraction * 100:3.0f} %")
    amount = human_bytes(pull.received) + (f" of {human_bytes(pull.total)}" if pull.total else "")
    parts.append(amount)
    if pull.speed > 0:
        parts.append(f"{human_bytes(pull.speed)}/s")
    if pull.eta is not None:
        parts.append(f"ETA {duration(pull.eta)}")
    if pull.phase == "verifying":
        parts.append("verifying")
    return "  ".join(parts)


async def _follow(pull: Pull, out: TextIO, interval: float) -> None:
    tty = out.isatty()
    reported = -1
    while pull.task is not None and not pull.task.done():
        line = format_progress(pull)
        if tty:
            out.write("\r\x1b[K" + line)
            out.flush()
        else:
            step = int((pull.fraction or 0.0) * 10)
            if step > reported:
                reported = step
                print(line, file=out, flush=True)
        await asyncio.sleep(interval)
    if pull.task is not None:
        await asyncio.gather(pull.task, return_exceptions=True)
    end = format_progress(pull)
    print(("\r\x1b[K" + end) if tty else end, file=out, flush=True)


async def _pull(
    models_dir: Path, url: str, filename: str, sha256: str, out: TextIO, interval: float
) -> Pull:
    manager = PullManager(models_dir)
    try:
        pull = manager.start(url, filename=filename, sha256=sha256)
        await _follow(pull, out, interval)
        return pull
    finally:
        await manager.close()  # an interrupted pull keeps its .part file


def pull_model(
    models_dir: Path,
    url: str,
    *,
    filename: str = "",
    sha256: str = "",
    out: TextIO | None = None,
    interval: float = 0.2,
) -> Path:
    """Download ``url`` into ``models_dir``; returns the file. Raises PullError on failure."""
    started = time.monotonic()
    stream = out if out is not None else sys.stderr
    pull = asyncio.run(_pull(models_dir, url, filename, sha256, stream, interval))
    if pull.status != "done":
        raise PullError(pull.error or f"the pull ended as {pull.status}")
    elapsed = time.monotonic() - started
    print(f"{pull.filename}: {human_bytes(pull.received)} in {elapsed:.1f} s", file=stream)
    return pull.dest
