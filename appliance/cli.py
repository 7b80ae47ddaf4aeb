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

from appliance.engine.registry import ModelRegistry, model_id_for
from appliance.errors import ApplianceError
from appliance.settings import FIELD_DOCS, Settings, load_settings
from appliance.store.db import Database
from appliance.store.keys import KeyLimits, KeyStore, KeySummary
from appliance.store.ledger import DEFAULT_PRICES, Ledger, Price
from appliance.store.money import format_credits, parse_credits
from appliance.store.owner import OwnerSettings

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
    for name in Settings.__struct_fields__:
        if name in ("data_dir", "models_dir"):
            continue
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
    credit = create.add_mutually_exclusive_group()
    credit.add_argument(
        "--credits",
        help="starting balance in credits (default: unlimited, or the configured starter credits)",
    )
    credit.add_argument("--unlimited", action="store_true", help="no balance limit")
    create.add_argument("--models", help="comma-separated model ids this key may use")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight at once")
    create.add_argument("--expires", help="date or ISO time (UTC) after which the key fails")
    create.add_argument("--allowance", help="credits added each period (a daily bonus)")
    create.add_argument(
        "--period", choices=["day", "month"], default="day", help="allowance period (default day)"
    )
    _add_dirs(create)
    topup = keys.add_parser("topup", help="add credits to a key's balance")
    topup.add_argument("name")
    topup.add_argument("amount", help="credits, e.g. 5 or 0.25")
    _add_dirs(topup)
    listing = keys.add_parser("list", help="list keys with their usage")
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    _add_dirs(listing)
    revoke = keys.add_parser("revoke", help="revoke a key (requests with it get 401)")
    revoke.add_argument("name")
    _add_dirs(revoke)

    admin = commands.add_parser("admin", help="admin page access").add_subparsers(
        dest="admin_command", required=True
    )
    setpw = admin.add_parser("set-password", help="set the admin password (reads stdin)")
    setpw.add_argument("--password", help="the password (default: read one line from stdin)")
    _add_dirs(setpw)

    prices = commands.add_parser("prices", help="per-model prices").add_subparsers(
        dest="prices_command", required=True
    )
    plist = prices.add_parser("list", help="show prices (credits per 1M tokens)")
    _add_dirs(plist)
    pset = prices.add_parser("set", help="set a model's prices ('*' = default for all)")
    pset.add_argument("model")
    pset.add_argument("--input", required=True, help="credits per 1M prompt tokens")
    pset.add_argument("--output", required=True, help="credits per 1M completion tokens")
    _add_dirs(pset)

    config = commands.add_parser("config", help="owner settings kept in the database")
    config_cmds = config.add_subparsers(dest="config_command", required=True)
    cset = config_cmds.add_parser("set", help="set starter_credits (credits new keys get)")
    cset.add_argument("name", choices=["starter_credits"])
    cset.add_argument("value")
    _add_dirs(cset)

    models = commands.add_parser("models", help="list or pull models").add_subparsers(
        dest="models_command", required=True
    )
    mlist = models.add_parser("list", help="list the GGUF models this box can serve")
    mlist.add_argument("--json", action="store_true", help="print a JSON array")
    _add_dirs(mlist, models=True)
    pull = models.add_parser(
        "pull",
        help="download a GGUF from a URL into the models directory (progress on stderr; "
        "run again to resume)",
    )
    pull.add_argument("url", help="http(s) URL of a .gguf file, e.g. a Hugging Face resolve link")
    pull.add_argument("--name", default="", help="file name to save as (default: from the URL)")
    pull.add_argument("--sha256", default="", help="expected SHA-256 of the file")
    _add_dirs(pull, models=True)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.__struct_fields__}
    try:
        return load_settings(overrides)
    except msgspec.ValidationError as exc:
        raise CliError(f"invalid setting: {exc}") from exc


async def _with_db(settings: Settings, fn: Callable[[Database], Awaitable[Any]]) -> Any:
    db = await Database.open(settings.data_dir)
    try:
        return await fn(db)
    finally:
        await db.close()


def _credits(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_credits(text)
    except ValueError as exc:
        raise CliError(f"{what}: {exc}") from exc


def _limits(args: argparse.Namespace) -> KeyLimits:
    return KeyLimits(
        credits=_credits(args.credits, "--credits"),
        unlimited=args.unlimited,
        models=[m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
        rpm=args.rpm,
        tpm=args.tpm,
        concurrency=args.concurrency,
        expires=args.expires,
        allowance=_credits(args.allowance, "--allowance"),
        allowance_period=args.period if args.allowance else None,
    )


async def _create_key(db: Database, args: argparse.Namespace) -> tuple[str, KeySummary]:
    starter = await OwnerSettings(db).get("starter_credits")
    return await KeyStore(db).create(args.name, _limits(args), starter_credits=starter)


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return str(args.password)
    if sys.stdin.isatty():
        import getpass

        return getpass.getpass("New admin password: ")
    return sys.stdin.readline().rstrip("\n")


_JSON = msgspec.json.Encoder(decimal_format="number")


def _print_keys(keys: list[KeySummary], as_json: bool) -> None:
    if as_json:
        print(_JSON.encode(keys).decode())
        return
    print(
        f"{'NAME':20} {'PREFIX':14} {'CREATED':25} {'REVOKED':8} {'PROMPT':>9} {'COMPL':>9} "
        f"{'BALANCE':>14}"
    )
    for k in keys:
        balance = "unlimited" if k.balance is None else str(k.balance)
        print(
            f"{k.name:20} {k.prefix:14} {k.created:25} {('yes' if k.revoked else 'no'):8} "
            f"{k.prompt_tokens:>9} {k.completion_tokens:>9} {balance:>14}"
        )


def _run_keys(args: argparse.Namespace, settings: Settings) -> None:
    if args.keys_command == "create":
        key, summary = asyncio.run(_with_db(settings, lambda db: _create_key(db, args)))
        print(
            f"Created key '{summary.name}' ({summary.prefix}...). "
            "Store it now: it is not shown again."
        )
        print(key)
    elif args.keys_command == "list":
        _print_keys(asyncio.run(_with_db(settings, lambda db: KeyStore(db).list())), args.json)
    elif args.keys_command == "revoke":
        summary = asyncio.run(_with_db(settings, lambda db: KeyStore(db).revoke(args.name)))
        print(f"Revoked key '{summary.name}' ({summary.prefix}...)")
    elif args.keys_command == "topup":
        amount = _credits(args.amount, "amount") or 0
        summary = asyncio.run(_with_db(settings, lambda db: KeyStore(db).topup(args.name, amount)))
        print(f"Key '{summary.name}' balance: {summary.balance} credits")


def _run_prices(args: argparse.Namespace, settings: Settings) -> None:
    if args.prices_command == "set":
        price = Price(_credits(args.input, "--input") or 0, _credits(args.output, "--output") or 0)
        asyncio.run(_with_db(settings, lambda db: Ledger(db).set_price(args.model, price)))
    table = asyncio.run(_with_db(settings, lambda db: Ledger(db).prices()))
    table.setdefault("*", DEFAULT_PRICES)
    print(f"{'MODEL':40} {'INPUT/1M':>12} {'OUTPUT/1M':>12}")
    for model, price in table.items():
        print(
            f"{model:40} {format_credits(price.input_per_million)!s:>12} "
            f"{format_credits(price.output_per_million)!s:>12}"
        )


def _run_models(args: argparse.Namespace, settings: Settings) -> None:
    if args.models_command == "pull":
        _run_pull(args, settings)
        return
    infos = ModelRegistry(settings.models_dir).scan()
    if args.json:
        print(msgspec.json.encode(infos).decode())
        return
    print(f"{'ID':40} {'ARCH':12} {'CONTEXT':>8} {'SIZE MB':>8}  SOURCE")
    for m in infos:
        source = "embedded" if m.embedded else m.path
        print(
            f"{m.id:40} {m.architecture:12} {m.context_length:>8} "
            f"{m.size_bytes / 1e6:>8.1f}  {source}"
        )


def _run_pull(args: argparse.Namespace, settings: Settings) -> None:
    from appliance.admin.pulls import PullError
    from appliance.pull_cli import pull_model

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a log line per request breaks the bar
    try:
        path = pull_model(settings.models_dir, args.url, filename=args.name, sha256=args.sha256)
    except PullError as exc:
        raise CliError(str(exc)) from exc
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        raise
    # Last stdout line: the model id the server will serve it as (scripts read it).
    print(path)
    print(model_id_for(path))


def _run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.command == "serve":
        from appliance.engine.rpc import RpcError, parse_endpoints, register_rpc_servers
        from appliance.server import serve

        try:  # before the port opens: a bad RPC setup is one line on stderr, exit 1
            register_rpc_servers(parse_endpoints(settings.rpc_servers))
        except RpcError as exc:
            raise CliError(str(exc)) from exc
        serve(settings)
    elif args.command == "keys":
        _run_keys(args, settings)
    elif args.command == "admin":
        password = _read_password(args)
        asyncio.run(_with_db(settings, lambda db: OwnerSettings(db).set_admin_password(password)))
        print("Admin password updated.")
    elif args.command == "prices":
        _run_prices(args, settings)
    elif args.command == "config":
        value = _credits(args.value, args.name)
        asyncio.run(_with_db(settings, lambda db: OwnerSettings(db).set(args.name, value)))
        print(f"{args.name} = {format_credits(value)}")
    elif args.command == "models":
        _run_models(args, settings)
    else:
        raise CliError(f"unknown command {args.command}")
    return 0


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
