"""API key format: checksum, prefix, length; malformed keys never reach the database; the
plaintext key is stored nowhere (only its sha256 and a short display prefix)."""

from __future__ import annotations

import string
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.errors import AuthenticationError
from appliance.store.db import DB_FILENAME, Database
from appliance.store.keyformat import (
    KEY_PREFIX,
    _checksum,
    display_prefix,
    generate_key,
    hash_key,
    is_well_formed,
)
from appliance.store.keys import KeyLimits, KeyStore

ALPHABET = string.digits + string.ascii_letters
KEY_LEN = len(KEY_PREFIX) + 32 + 6

pytestmark = pytest.mark.anyio


def test_generated_keys_are_well_formed_and_distinct() -> None:
    keys = {generate_key() for _ in range(500)}
    assert len(keys) == 500
    for key in keys:
        assert is_well_formed(key)
        assert key.startswith(KEY_PREFIX)
        assert len(key) == KEY_LEN
        assert all(c in ALPHABET for c in key[len(KEY_PREFIX) :])
        assert display_prefix(key) == key[:12]
        assert hash_key(key) != key and len(hash_key(key)) == 64


def test_every_single_character_change_is_rejected() -> None:
    """CRC32 catches every burst of <= 32 bits, so no one-character typo can pass."""
    key = generate_key()
    for i in range(len(key)):
        for c in ALPHABET + "_-.é ":
            if c == key[i]:
                continue
            typo = key[:i] + c + key[i + 1 :]
            assert not is_well_formed(typo), (i, c)


@settings(database=None, max_examples=300, deadline=None)
@given(
    random_part=st.text(ALPHABET, min_size=32, max_size=32),
    position=st.integers(0, KEY_LEN - 1),
    shift=st.integers(1, len(ALPHABET) - 1),
)
def test_random_single_substitutions_are_rejected(
    random_part: str, position: int, shift: int
) -> None:
    # Every input comes from hypothesis (no generate_key() here): drawing a strategy that
    # depends on fresh randomness makes hypothesis replay inconsistently and fail as flaky.
    body = KEY_PREFIX + random_part
    key = body + _checksum(body)
    assert is_well_formed(key)
    old = key[position]
    new = ALPHABET[(ALPHABET.index(old) + shift) % len(ALPHABET)] if old in ALPHABET else "x"
    assert not is_well_formed(key[:position] + new + key[position + 1 :])


def test_swapped_adjacent_characters_are_rejected() -> None:
    key = generate_key()
    for i in range(len(KEY_PREFIX), len(key) - 1):
        if key[i] != key[i + 1]:
            swapped = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
            assert not is_well_formed(swapped)


def test_bad_checksum_rejected() -> None:
    key = generate_key()
    body = key[:-6]
    assert is_well_formed(body + _checksum(body))
    check = _checksum(body)
    wrong = ("0" if check[0] != "0" else "1") + check[1:]
    assert not is_well_formed(body + wrong)
    assert not is_well_formed(body + check[::-1]) or check == check[::-1]


@pytest.mark.parametrize("prefix", ["sk_", "apl-", "APL_", "ap_", "xpl_", "apl__"])
def test_wrong_prefix_rejected_even_with_a_matching_checksum(prefix: str) -> None:
    random_part = generate_key()[len(KEY_PREFIX) : -6]
    body = prefix + random_part
    body = body[: KEY_LEN - 6].ljust(KEY_LEN - 6, "a")
    assert not is_well_formed(body + _checksum(body))


@pytest.mark.parametrize("length", [0, 1, 31, 33, 40])
def test_wrong_length_rejected_even_with_a_matching_checksum(length: int) -> None:
    body = KEY_PREFIX + "a" * length
    assert not is_well_formed(body + _checksum(body))


def test_truncated_or_extended_or_odd_keys_rejected() -> None:
    key = generate_key()
    for bad in (
        key[:-1],
        key + "a",
        key[1:],
        " " + key,
        key + "\n",
        key.upper(),
        key.lower(),
        "",
        KEY_PREFIX,
        "Bearer " + key,
        key[:-6] + "!!!!!!",
        key.replace(key[10], "é", 1),
    ):
        if bad != key:
            assert not is_well_formed(bad), bad


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[KeyStore]:
    store = KeyStore(await Database.open(tmp_path))
    yield store
    await store.db.close()


async def test_authenticate_refuses_malformed_keys_without_any_query(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, _ = await store.create("alice")
    assert (await store.authenticate(good)).name == "alice"

    async def no_query(*args: object, **kwargs: object) -> None:
        raise AssertionError("a malformed key reached the database")

    monkeypatch.setattr(store.db, "fetchone", no_query)
    monkeypatch.setattr(store.db, "fetchall", no_query)
    body = good[:-6]
    check = _checksum(body)
    bad_check = body + ("0" if check[0] != "0" else "1") + check[1:]
    typo = good[:20] + ("a" if good[20] != "a" else "b") + good[21:]
    for bad in (bad_check, typo, good[:-1], "sk-" + good[3:], "", None):
        with pytest.raises(AuthenticationError):
            await store.authenticate(bad)


async def test_authenticate_well_formed_but_unknown_key(store: KeyStore) -> None:
    await store.create("alice")
    with pytest.raises(AuthenticationError, match="Incorrect API key"):
        await store.authenticate(generate_key())


async def test_plaintext_key_never_in_database_files(store: KeyStore, tmp_path: Path) -> None:
    keys = [
        (await store.create(f"k{i}", KeyLimits(credits=10**9 * i) if i % 2 else None))[0]
        for i in range(6)
    ]
    for key in keys:
        await store.authenticate(key)
    await store.revoke("k1")
    await store.topup("k3", 5)

    def all_bytes() -> bytes:
        found = b""
        for path in tmp_path.iterdir():
            if path.name.startswith(DB_FILENAME):
                found += path.read_bytes()
        return found

    assert (tmp_path / f"{DB_FILENAME}-wal").exists()  # the writes are still in the WAL
    data = all_bytes()
    assert data
    for key in keys:
        assert key.encode() not in data
        assert key[len(display_prefix(key)) :].encode() not in data  # not even the secret part
        assert hash_key(key).encode() in data  # the hash is what is stored
    await store.db.close()
    data = all_bytes()  # after the checkpoint into the main file
    for key in keys:
        assert key.encode() not in data
        assert key[len(display_prefix(key)) :].encode() not in data
    store.db = await Database.open(tmp_path)  # the fixture closes it again


async def test_listing_shows_only_the_prefix(store: KeyStore) -> None:
    key, summary = await store.create("alice")
    assert summary.prefix == display_prefix(key)
    listed = await store.list()
    text = msgspec.json.encode(listed).decode()
    assert key not in text
    assert key[12:] not in text
