"""Where the admin page's templates and static files live (repo checkout or installed wheel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["web_root"]


def web_root() -> Path:
    """The ``web/`` directory: ``appliance.web`` in a wheel, ``<repo>/web`` in a checkout."""
    spec = importlib.util.find_spec("appliance.web")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "web"
