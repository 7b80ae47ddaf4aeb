"""Inference: model discovery, the llama.cpp engine and its scheduler (no HTTP here)."""
