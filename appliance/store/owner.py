"""The owner's runtime settings (JSON values in ``owner_settings``) and the admin password."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import aiosqlite
import msgspec

from appliance.store.db import Database

__all__ = ["OwnerSettings", "hash_password", "verify_password"]

# scrypt parameters: ~50 ms and 16 MiB per check; slow enough for passwords, fine for sign-in.
_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    check = hashlib.scrypt(
        password.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
    )
    return hmac.compare_digest(check.hex(), digest)


class OwnerSettings:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, name: str, default: Any = None) -> Any:
        row = await self.db.fetchone("SELECT value FROM owner_settings WHERE name = ?", (name,))
        return default if row is None else msgspec.json.decode(row[0])

    async def set(self, name: str, value: Any) -> None:
        encoded = msgspec.json.encode(value).decode()

        async def write(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "INSERT INTO owner_settings (name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (name, encoded),
            )

        await self.db.write(write)

    async def set_admin_password(self, password: str) -> None:
        if len(password) < 8:
            from appliance.errors import InvalidRequestError

            raise InvalidRequestError("The admin password needs at least 8 characters")
        await self.set("admin_password", hash_password(password))

    async def check_admin_password(self, password: str) -> bool:
        stored = await self.get("admin_password")
        return isinstance(stored, str) and verify_password(password, stored)

    async def ensure_admin_password(self) -> str | None:
        """Generate one on first start; return it (to print once) or None if one exists."""
        if await self.get("admin_password") is not None:
            return None
        password = secrets.token_urlsafe(12)
        await self.set("admin_password", hash_password(password))
        return password
