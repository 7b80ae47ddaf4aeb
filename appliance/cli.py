"""Command line: ``appliance serve | keys ... | models ...`` (also ``python -m appliance``).

Errors exit non-zero with one line on stderr; ``keys create`` prints the plaintext key alone
on the last line of stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from appliance.engine.registry import ModelRegistry
from appliance.errors import ApplianceError
from appliance.settings import FIELD_DOCS, Settings, load_settings
from appliance.store.db import Database
from appliance.store.keys import KeyStore, KeySummary

__all__ = ["main"]


class CliError(Exception):
    """A user-facing CLI failure: printed as one line, exit status 1."""


def _add_dirs(parser: argparse.ArgumentParser, *, models: bool = False) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        help=FIELD_DOCS["data_dir"] + " [env APPLIANCE_DATA_DIR, default ./data]",
    )
    if models:
        parser.add_argument(
            "--models-dir",
            type=Path,
            help=FIELD_DOCS["models_dir"] + " [env APPLIANCE_MODELS_DIR, default ./models]",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the OpenAI-compatible server")
    _add_dirs(serve, models=True)
    for name in (
        "host",
        "port",
        "default_model",
        "threads",
        "ctx_size",
        "parallel",
        "batch_size",
        "n_gpu_layers",
        "max_body_bytes",
        "max_queue",
        "default_max_tokens",
        "log_level",
    ):
        field_type = type(getattr(Settings(), name))
        serve.add_argument(
            "--" + name.replace("_", "-"),
            type=field_type,
            help=f"{FIELD_DOCS[name]} [env APPLIANCE_{name.upper()}]",
        )

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", help="create a key; prints it once, on the last line")
    create.add_argument("name")
    _add_dirs(create)
    listing = keys.add_parser("list", help="list keys with their usage")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    _add_dirs(listing)
    revoke = keys.add_parser("revoke", help="revoke a key (requests with it get 401)")
    revoke.add_argument("name")
    _add_dirs(revoke)

    models = commands.add_parser("models", help="list models").add_subparsers(
        dest="models_command", required=True
    )
    mlist = models.add_parser("list", help="list the GGUF models this box can serve")
    mlist.add_argument("--json", action="store_true", help="print a JSON array")
    _add_dirs(mlist, models=True)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__struct_fields__}
    try:
        return load_settings(overrides)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid setting: {exc}") from exc


async def _with_keys(settings: Settings, fn: Callable[[KeyStore], Awaitable[Any]]) -> Any:
    db = await Database.open(settings.data_dir)
    try:
        return await fn(KeyStore(db))
    finally:
        await db.close()


def _print_keys(keys: list[KeySummary], as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode(keys).decode())
        return
    print(f"{'NAME':20} {'PREFIX':14} {'CREATED':25} {'REVOKED':8} {'PROMPT':>9} {'COMPL':>9}")
    for k in keys:
        print(
            f"{k.name:20} {k.prefix:14} {k.created:25} {('yes' if k.revoked else 'no'):8} "
            f"{k.prompt_tokens:>9} {k.completion_tokens:>9}"
        )


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.command == "serve":
        from appliance.server import serve

        serve(settings)
        return 0
    if args.command == "keys":
        if args.keys_command == "create":
            key, summary = asyncio.run(_with_keys(settings, lambda ks: ks.create(args.name)))
            print(
                f"Created key '{summary.name}' ({summary.prefix}...). "
                "Store it now: it is not shown again."
            )
            print(key)
        elif args.keys_command == "list":
            _print_keys(asyncio.run(_with_keys(settings, lambda ks: ks.list())), args.json)
        elif args.keys_command == "revoke":
            summary = asyncio.run(_with_keys(settings, lambda ks: ks.revoke(args.name)))
            print(f"Revoked key '{summary.name}' ({summary.prefix}...)")
        return 0
    if args.command == "models":
        infos = ModelRegistry(settings.models_dir).scan()
        if args.json:
            print(msgspec.json.encode(infos).decode())
        else:
            print(f"{'ID':40} {'ARCH':12} {'CONTEXT':>8} {'SIZE MB':>8}  SOURCE")
            for m in infos:
                source = "embedded" if m.embedded else m.path
                print(
                    f"{m.id:40} {m.architecture:12} {m.context_length:>8} "
                    f"{m.size_bytes / 1e6:>8.1f}  {source}"
                )
        return 0
    raise CliError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return _run(args)
    except (CliError, ApplianceError) as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"appliance: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
