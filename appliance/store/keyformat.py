"""API key format: ``apl_`` + 32 random base62 chars + 6-char base62 CRC32 of the rest.

Like GitHub's tokens: the fixed prefix lets secret scanners spot leaked keys, and the
checksum rejects a mistyped or made-up key before any database lookup.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import zlib

__all__ = ["KEY_PREFIX", "display_prefix", "generate_key", "hash_key", "is_well_formed"]

KEY_PREFIX = "apl_"
_ALPHABET = string.digits + string.ascii_letters
_RANDOM_LEN = 32
_CHECK_LEN = 6
_KEY_LEN = len(KEY_PREFIX) + _RANDOM_LEN + _CHECK_LEN
_DISPLAY_LEN = len(KEY_PREFIX) + 8


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        digits.append(_ALPHABET[rem])
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), _CHECK_LEN)


def generate_key() -> str:
    body = KEY_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(_RANDOM_LEN))
    return body + _checksum(body)


def is_well_formed(key: str) -> bool:
    """Prefix, length, alphabet and checksum all right (no database needed)."""
    if len(key) != _KEY_LEN or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if any(c not in _ALPHABET for c in rest):
        return False
    body, check = key[:-_CHECK_LEN], key[-_CHECK_LEN:]
    return secrets.compare_digest(_checksum(body), check)


def hash_key(key: str) -> str:
    # Keys carry 190 bits of randomness, so a fast hash is safe; a slow KDF would only add
    # latency to every request.
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def display_prefix(key: str) -> str:
    return key[:_DISPLAY_LEN]
