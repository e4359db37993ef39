"""The ``gateway`` command: run, dev, migrate, seed, token."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from gateway.config import Settings, load_settings
from gateway.errors import (
    ERROR_CODES,
    ConfigError,
    GatewayError,
    InvalidRequest,
    StoreUnavailable,
)
from gateway.logs import fatal, setup_logging

log = logging.getLogger("gateway")

_TTL = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

if TYPE_CHECKING:
    from gateway.store.postgres import PostgresStore


MAX_DURATION_S = 366 * 86400


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``30m``, ``1h``, ``7d`` -> seconds (at most a year)."""
    match = _TTL.match(text.strip())
    if not match or int(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad duration {text!r}: use e.g. 3600, 30m, 1h or 7d")
    seconds = int(match.group(1)) * _UNITS[match.group(2)]
    if seconds > MAX_DURATION_S:
        raise argparse.ArgumentTypeError(f"duration {text!r} is over a year: use at most 366d")
    return seconds


def install_signal_handlers(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


async def _run(settings: Settings) -> None:
    from gateway.app import Gateway

    gateway = Gateway(settings)
    install_signal_handlers(gateway.stop)
    await gateway.run()


def cmd_run(_args: argparse.Namespace) -> int:
    from gateway.config import advice, unknown_settings

    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    for name in unknown_settings(os.environ):
        log.warning("%s is not a setting: ignored", name)
    for text in advice(settings):
        log.warning("%s", text)
    settings.require_jwt_keys()
    asyncio.run(_run(settings))
    return 0


async def _retire(settings: Settings, quiet_s: float) -> str | None:
    """Retire the replica ``settings`` name; None when done, else why not."""
    from gateway.app import Gateway

    gateway = Gateway(settings, retiring=True)
    install_signal_handlers(gateway.stop)
    retiring = asyncio.create_task(gateway.retire(quiet_s))
    try:
        await gateway.run()
    finally:
        if not retiring.done():
            retiring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await retiring
    client_id = settings.mqtt_client_id
    link = gateway.link
    if link is not None and link.foreign_topic is not None:
        return (
            f"not retired: a request queued for {client_id} came on {link.foreign_topic}, "
            f"which is not a request topic under GATEWAY_TOPIC_PREFIX={settings.topic_prefix}. "
            "Nothing from there on was answered, and the session (with what is queued in it) "
            "was kept: run gateway retire again with the removed replica's own "
            "GATEWAY_TOPIC_PREFIX and GATEWAY_SHARE_GROUP"
        )
    done = retiring.done() and not retiring.cancelled() and retiring.result()
    if not done and link is not None and link.session_present:
        return (
            f"not retired: stopped before the requests queued for {client_id} were all "
            "answered; its session (with what is still queued) was kept: run gateway retire "
            "again"
        )
    if not done:
        return (
            f"nothing retired: the broker had no session for {client_id} (check "
            "GATEWAY_MQTT_CLIENT_ID: it must be the removed replica's)"
        )
    if link is None or not link.session_ended:
        return (
            f"not retired: the connection to the broker dropped before the session of "
            f"{client_id} could be ended; check that no running replica uses this client id, "
            "then run gateway retire again"
        )
    return None


def cmd_retire(args: argparse.Namespace) -> int:
    settings = load_settings()
    setup_logging(settings.log_level, settings.log_format)
    settings.require_jwt_keys()
    problem = asyncio.run(_retire(settings, args.quiet))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    print(f"retired {settings.mqtt_client_id}: its queued requests answered, its session ended")
    return 0


def _tool_format(settings: Settings) -> str:
    """One-shot commands log plain text for the person at the terminal, unless
    GATEWAY_LOG_FORMAT says otherwise (a job whose logs a shipper reads)."""
    return settings.log_format if "log_format" in settings.model_fields_set else "text"


def cmd_migrate(args: argparse.Namespace) -> int:
    from gateway.store.migrate import migrate

    settings = load_settings()
    setup_logging(settings.log_level, _tool_format(settings))
    applied = asyncio.run(migrate(settings.database_url, wait_s=args.wait))
    print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from gateway.core.seedfile import parse_seed

    settings = load_settings()
    setup_logging(settings.log_level, _tool_format(settings))
    path = Path(args.file)
    if path.is_dir():
        raise ConfigError(f"{path} is a directory: give the seed file (.yaml, .yml or .json)")
    if not path.is_file():
        raise ConfigError(f"seed file {path} not found")
    try:
        data = path.read_bytes()
    except OSError as exc:  # permission denied, say
        raise ConfigError(f"cannot read seed file {path}: {exc.strerror or exc}") from None
    seed = parse_seed(data, name=path.name)
    for project in seed.projects:
        if project.maxDurationHours > settings.max_session_hours:
            raise ConfigError(
                f"{path.name}: project {project.projectId} has maxDurationHours "
                f"{project.maxDurationHours:g}, above GATEWAY_MAX_SESSION_HOURS "
                f"({settings.max_session_hours:g}): its sessions could not open without an "
                "explicit maxDurationHours; lower it (or raise the limit)"
            )

    async def apply() -> dict[str, int]:
        store = await migrated_store(settings.database_url)
        try:
            return await store.seed(seed)
        finally:
            await store.close()

    counts = asyncio.run(apply())
    changed = counts.pop("changed")
    held = ", ".join(f"{n} {what}" for what, n in counts.items())
    print(f"seeded {held} ({changed} row(s) new or changed)")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.devmode import dev_token

    settings = load_settings()
    if not settings.jwt_secret:
        raise ConfigError("gateway token signs with GATEWAY_JWT_SECRET (HS256): set it first")
    if not args.sub.strip():
        raise ConfigError("--sub names the user (auth0Id) the token is for: it cannot be empty")
    print(dev_token(settings, args.sub, args.ttl))
    return 0


def parse_since(text: str) -> datetime:
    """``2025-10-19T08:00:00Z`` or a duration ago: ``90s``, ``30m``, ``2h``, ``7d``."""
    if _TTL.match(text.strip()):
        return datetime.now(UTC) - timedelta(seconds=parse_ttl(text))
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad time {text!r}: use an ISO time (2025-10-19T08:00:00Z) or 30m, 2h, 7d"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


async def migrated_store(database_url: str) -> PostgresStore:
    """A one-connection store on a migrated database (else a ConfigError saying to migrate)."""
    from gateway.app import check_schema
    from gateway.store.postgres import PostgresStore

    store = await PostgresStore.connect(database_url, max_size=1)
    await check_schema(store)  # closes the store when it refuses
    return store


DEAD_LETTERS_LIMIT = 100


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def error_code(text: str) -> str:
    """A dead letter's reason: one of the error codes (an unknown one listed nothing)."""
    code = text.strip().upper()
    if code not in ERROR_CODES:
        raise argparse.ArgumentTypeError(f"{text!r} is not an error code: {', '.join(ERROR_CODES)}")
    return code


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def settings_help() -> str:
    """The GATEWAY_* variables and their defaults, for ``gateway run --help``."""
    from gateway.config import Settings

    lines = ["configuration (environment; the README's Configuration table says more):"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default {default})"
        if field.description:  # what a default such as 0 stands for
            shown = f"{shown[:-1]}: {field.description})" if shown else f" ({field.description})"
        lines.append(f"  GATEWAY_{name.upper()}{shown}")
    return "\n".join(lines)


def cmd_dead_letters(args: argparse.Namespace) -> int:
    from gateway.core.rules import iso

    settings = load_settings()

    async def fetch() -> list[Any]:
        store = await migrated_store(settings.database_url)
        try:
            return await store.dead_letters(since=args.since, reason=args.reason, limit=args.limit)
        finally:
            await store.close()

    async def prune(before: datetime) -> int:
        store = await migrated_store(settings.database_url)
        try:
            return await store.prune_dead_letters(before)
        finally:
            await store.close()

    if args.prune_before is not None:
        if args.since or args.reason or args.json or args.limit != DEAD_LETTERS_LIMIT:
            raise ConfigError(
                "--prune-before deletes by age alone: it takes no --since, --reason, --limit "
                "or --json (list them first to see what would go)"
            )
        removed = asyncio.run(prune(args.prune_before))
        print(f"deleted {removed} dead letter(s) received before {iso(args.prune_before)}")
        return 0
    rows = asyncio.run(fetch())
    for row in rows:
        raw = bytes(row["payload"])
        try:
            payload, raw_b64 = raw.decode("utf-8"), None
        except UnicodeDecodeError:  # shown with \xNN escapes; --json also gives the bytes
            payload = raw.decode("utf-8", errors="backslashreplace")
            raw_b64 = base64.b64encode(raw).decode()
        if args.json:
            print(
                orjson.dumps(
                    {
                        "id": row["id"],
                        "receivedAt": iso(row["received_at"]),
                        "topic": row["topic"],
                        "reason": row["reason"],
                        "message": row["message"],
                        "auth0Id": row["auth0_id"],
                        "payload": payload,
                        **({"payloadBase64": raw_b64} if raw_b64 is not None else {}),
                        "payloadSize": row["payload_size"],
                        "truncated": row["truncated"],
                    }
                ).decode()
            )
        else:
            if raw_b64 is None:
                shown = repr(payload if len(payload) <= 120 else payload[:117] + "...")
            else:  # bytes as Python writes them: b'\xff\xfe...'
                shown = repr(raw[:120]) + ("..." if len(raw) > 120 else "")
            print(
                f"{iso(row['received_at'])}  {row['reason']:<20} {printable(row['topic'])}\n"
                f"    {printable(row['message'])}\n    user={printable(row['auth0_id'] or '-')} "
                f"size={row['payload_size']} payload={shown}"
            )
    if not args.json:
        more = f" (the newest {args.limit}: --limit to see more)" if len(rows) >= args.limit else ""
        print(f"{len(rows)} dead letter(s){more}", file=sys.stderr)
    return 0


# C0 controls, DEL and C1 controls: what a terminal acts on (colours, cursor moves, a cleared
# screen, a forged line) when a device's topic or field is printed as it was sent
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def printable(text: str) -> str:
    """``text`` for a terminal: control characters written as ``\\xNN``."""
    return text.translate(_CONTROLS)


def cmd_simulate(args: argparse.Namespace) -> int:
    from gateway.simulate import (
        FleetPlan,
        SimulationError,
        open_sessions,
        parse_ws_url,
        run_fleet,
    )

    checks = [
        (args.devices >= 1, "--devices must be at least 1"),
        (1 <= args.processes <= args.devices, "--processes must be between 1 and --devices"),
        (args.records >= 1, "--records must be at least 1"),
        (args.rate >= 0, "--rate must be 0 (saturate) or a positive records/s"),
        (args.window >= 1, "--window must be at least 1"),
        (0 <= args.duplicates <= 1, "--duplicates is a share between 0 and 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    settings = load_settings()
    token = args.token
    if token is None:
        if not (args.sub and settings.jwt_secret):
            raise ConfigError("give --token, or --sub with GATEWAY_JWT_SECRET set to mint one")
        from gateway.devmode import dev_token

        token = dev_token(settings, args.sub, 3600)
    host, port, path, tls = parse_ws_url(args.url)
    if not (args.session or (args.project and args.sector)):
        raise ConfigError("give --session ID (repeatable), or --project and --sector to open")
    try:
        sessions = list(args.session or [])
        if not sessions:
            sessions = open_sessions(
                args.url, settings.topic_prefix, token, args.project, args.sector
            )
            print(f"opened {len(sessions)} session(s): {', '.join(sessions)}", file=sys.stderr)
        plan = FleetPlan(
            host=host,
            port=port,
            path=path,
            tls=tls,
            prefix=settings.topic_prefix,
            token=token,
            sessions=sessions,
            devices=args.devices,
            records=args.records,
            rate=args.rate,
            window=args.window,
            duplicates=args.duplicates,
            processes=args.processes,
        )
        summary = run_fleet(plan)
    except OSError as exc:  # refused, unreachable, timed out (TimeoutError is an OSError)
        raise SimulationError(
            f"{exc}. Is the broker listening at {args.url} and the gateway running? "
            "(gateway dev prints the devices' WebSocket URL)"
        ) from None
    print(summary.describe())
    return 0 if summary.replies == summary.sent and summary.errors == 0 else 1


def cmd_dev(args: argparse.Namespace) -> int:
    from gateway.devmode import run_dev

    return run_dev(keep=args.keep)


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    more: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """A subcommand whose own --help starts with the summary the command list shows, then
    ``more``: what it does beyond that, and the GATEWAY_* variables it needs."""
    kwargs.setdefault("description", f"{summary[0].upper()}{summary[1:]}. {more}")
    return sub.add_parser(name, help=summary, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from gateway import __version__

    parser = argparse.ArgumentParser(
        prog="gateway", description="Hydrobit production gateway (MQTT <-> PostgreSQL)"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_command(
        sub,
        "run",
        "run the gateway, configured by GATEWAY_* variables",
        "",
        description="Run the gateway until SIGTERM or Ctrl-C. It needs at least\n"
        "GATEWAY_DATABASE_URL (a migrated database), GATEWAY_MQTT_URL and\n"
        "GATEWAY_JWT_SECRET or GATEWAY_JWT_JWKS (the keys tokens are verified with).",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=cmd_run)

    p = add_command(
        sub,
        "dev",
        "run everything locally: PostgreSQL, Mosquitto, gateway",
        "It starts a throwaway PostgreSQL and Mosquitto on loopback (initdb, postgres and "
        "mosquitto must be installed), migrates, seeds a demo tenant, runs the gateway and "
        "prints commands to try. It needs no GATEWAY_* variable: it picks its own database, "
        "broker and ports (GATEWAY_JWT_SECRET, when set, is the secret it signs with).",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the broker's and the database's files on exit, to look at (a new "
        "gateway dev always starts afresh)",
    )
    p.set_defaults(func=cmd_dev)

    p = add_command(
        sub,
        "retire",
        "take the replica GATEWAY_MQTT_CLIENT_ID out for good: answer what the broker "
        "queued for it, then end its session (else it keeps a share of requests)",
        "It needs GATEWAY_MQTT_CLIENT_ID set to the removed replica's, and the rest of that "
        "replica's configuration (GATEWAY_DATABASE_URL, GATEWAY_MQTT_URL and its login, "
        "GATEWAY_TOPIC_PREFIX, GATEWAY_SHARE_GROUP, GATEWAY_JWT_SECRET or GATEWAY_JWT_JWKS), "
        "as for gateway run. A queued request outside GATEWAY_TOPIC_PREFIX stops it, "
        "unanswered, with the session kept (exit 1), as does Ctrl-C before it is done.",
    )
    p.add_argument(
        "--quiet",
        type=seconds,
        default=2.0,
        help="seconds without a request before ending (default %(default)s)",
    )
    p.set_defaults(func=cmd_retire)

    p = add_command(
        sub,
        "migrate",
        "apply pending database migrations",
        "It needs GATEWAY_DATABASE_URL (the database to migrate). Safe to run twice or from "
        "several processes at once: each migration is applied once.",
    )
    p.add_argument(
        "--wait",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for PostgreSQL to accept connections (containers starting)",
    )
    p.set_defaults(func=cmd_migrate)

    p = add_command(
        sub,
        "seed",
        "load companies, users, projects, sectors (YAML or JSON)",
        "It needs GATEWAY_DATABASE_URL (a migrated database). Loading the same file twice "
        "changes nothing; a project's maxDurationHours must be within "
        "GATEWAY_MAX_SESSION_HOURS.",
    )
    p.add_argument(
        "file",
        help="a YAML file, or the same structure in JSON (any name): companies, users, "
        "projects (README: seed file)",
    )
    p.set_defaults(func=cmd_seed)

    p = add_command(
        sub,
        "dead-letters",
        "list refused requests, newest first",
        "With --prune-before it deletes old ones instead. It needs GATEWAY_DATABASE_URL "
        "(the database the gateway records them in).",
    )
    p.add_argument("--since", type=parse_since, help="ISO time or a duration ago (30m, 2h, 7d)")
    p.add_argument(
        "--reason",
        type=error_code,
        help="an error code (any case): " + ", ".join(ERROR_CODES),
    )
    p.add_argument(
        "--limit",
        type=positive_int,
        default=DEAD_LETTERS_LIMIT,
        help="list at most this many, newest first (default %(default)s)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line (payloadBase64 holds a payload that is not UTF-8)",
    )
    p.add_argument(
        "--prune-before",
        type=parse_since,
        metavar="WHEN",
        help="delete (not list) those received before an ISO time or a duration ago (30d): "
        "the table keeps everything until pruned, e.g. daily from cron",
    )
    p.set_defaults(func=cmd_dead_letters)

    p = add_command(
        sub,
        "simulate",
        "a fleet of simulated devices over MQTT/WebSocket",
        "The devices send records into sessions, through the broker to a running gateway, and "
        "a summary of replies, latency and errors by code is printed (exit 1 if any request "
        "failed). --sub needs GATEWAY_JWT_SECRET to mint the devices' token (or give --token); "
        "topics start with GATEWAY_TOPIC_PREFIX. The devices connect to the broker "
        "anonymously (gateway dev's broker lets them in).",
    )
    p.add_argument(
        "--url",
        default="ws://127.0.0.1:9001/mqtt",
        help="the broker's WebSocket URL (default %(default)s)",
    )
    p.add_argument("--token", help="a JWT for the devices")
    p.add_argument("--sub", help="mint a token for this user with GATEWAY_JWT_SECRET")
    p.add_argument("--session", action="append", help="a session to record into (repeatable)")
    p.add_argument("--project", help="open sessions in this project (with --sector)")
    p.add_argument("--sector", action="append", help="a sector to open a session in (repeatable)")
    p.add_argument("--devices", type=int, default=8, help="simulated devices (default %(default)s)")
    p.add_argument(
        "--records",
        type=int,
        default=10_000,
        help="distinct records in all; --duplicates sends more on top (default %(default)s)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="records/s offered; 0 (the default) = as fast as the devices go",
    )
    p.add_argument(
        "--window",
        type=int,
        default=200,
        help="unanswered requests per device (default %(default)s)",
    )
    p.add_argument(
        "--duplicates",
        type=float,
        default=0.0,
        help="share of records sent twice, 0 to 1 (default 0)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="OS processes the devices are spread over (default %(default)s)",
    )
    p.set_defaults(func=cmd_simulate)

    p = add_command(
        sub,
        "token",
        "mint an HS256 development token",
        "It needs GATEWAY_JWT_SECRET (the token is signed with it) and uses "
        "GATEWAY_JWT_AUDIENCE and GATEWAY_JWT_ISSUER when set. The user must exist in the "
        "database (loaded by gateway seed), or every request with the token is answered "
        "FORBIDDEN: this command does not look at the database.",
    )
    p.add_argument(
        "--sub",
        required=True,
        help="the user (auth0Id); one gateway seed loaded, else requests are FORBIDDEN",
    )
    p.add_argument(
        "--ttl", type=parse_ttl, default=3600, help="lifetime: 3600, 30m, 1h, 7d (default 1h)"
    )
    p.set_defaults(func=cmd_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`gateway dead-letters | head`): stop quietly, as Python's
        # documentation recommends, without a traceback at exit when stdout is flushed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except InvalidRequest as exc:
        fatal(exc.message)
        return 2
    except ConfigError as exc:
        fatal(str(exc))
        return 2
    except StoreUnavailable as exc:
        unset = "" if "GATEWAY_DATABASE_URL" in os.environ else " (it is not set: the default)"
        fatal(f"{exc}. Is PostgreSQL running and GATEWAY_DATABASE_URL right{unset}?")
        return 1
    except GatewayError as exc:
        fatal(str(exc))
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
