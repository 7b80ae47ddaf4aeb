"""Serving logic: plain async Python between the HTTP routes and the engine (no HTTP here)."""
