"""The appliance: a single-process, OpenAI-compatible LLM server for a home GPU box."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
