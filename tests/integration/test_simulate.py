"""``gateway simulate`` (SPEC §6) run as a subprocess against the real broker and gateway: its
summary must agree with what the database stored, and its failures must say what to do."""

from __future__ import annotations

import re

import asyncpg
import orjson

from gateway.app import Gateway
from gateway.errors import SessionClosed, error_body
from gateway.simulate import error_code_of
from tests.support.devices import Device
from tests.support.extra_helpers import Completed, clean_env, run_cli
from tests.support.servers import Servers
from tests.support.tenants import JWT_SECRET, Tenant

PREFIX = "hydrobit/v2"
SUMMARY = re.compile(
    r"(?P<replies>\d+)/(?P<sent>\d+) answered in [\d.]+ s: [\d,]+ records/s, "
    r"ack latency \(publish to reply\) p50 [\d.]+ ms p99 [\d.]+ ms, "
    r"(?P<dups>\d+) duplicates \(idempotent\), "
    r"(?P<errors>\d+) errors(?: \((?P<codes>[A-Z_, \d]+)\))?; fleet CPU"
)


def _env() -> dict[str, str]:
    return clean_env(GATEWAY_JWT_SECRET=JWT_SECRET, GATEWAY_TOPIC_PREFIX=PREFIX)


def _ws(servers: Servers) -> str:
    return f"ws://{servers.mqtt_host}:{servers.ws_port}/mqtt"


async def _simulate(*args: str, expect_rc: int) -> tuple[Completed, dict[str, int]]:
    """Run ``gateway simulate ARGS``; its exit code must be ``expect_rc``; the summary's counts."""
    done = await run_cli("simulate", *args, env=_env(), timeout=120)
    assert done.returncode == expect_rc, done.stdout + done.stderr[-2000:]
    summary = SUMMARY.search(done.stdout)
    assert summary, done.stdout
    counts = {k: int(v) for k, v in summary.groupdict().items() if k != "codes"}
    assert (summary["codes"] is None) == (counts["errors"] == 0), done.stdout
    return done, counts


async def _ledger(database: str, session_id: str) -> tuple[int, int, int]:
    """(ledger rows, distinct client event ids, the session's total_records) of a session."""
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS n, count(DISTINCT client_event_id) AS distinct_events,
                      (SELECT total_records FROM production_sessions WHERE session_id = $1) AS total
               FROM production_records WHERE session_id = $1""",
            session_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["distinct_events"]), int(row["total"])


async def test_offered_rate_with_duplicates_stores_each_record_once(
    servers: Servers, gateway: Gateway, tenant: Tenant, database: str
) -> None:
    """Opens the session itself, offers 600 records at 1,500/s with every tenth sent twice:
    all answered, the duplicates come back idempotent, the ledger holds 600 rows."""
    done, summary = await _simulate(
        *("--url", _ws(servers), "--sub", tenant.user),
        *("--project", tenant.project_id, "--sector", tenant.sector_id),
        *("--devices", "4", "--records", "600", "--rate", "1500", "--duplicates", "0.1"),
        expect_rc=0,
    )
    opened = re.search(r"opened 1 session\(s\): (\w+)", done.stderr)
    assert opened, done.stderr[-2000:]
    assert "replies" in done.stderr  # the progress bar
    # ... which ends on the rate the summary reports (both from the first publish on)
    bar_rate = re.findall(r"660/660 replies ([\d,]+)/s", done.stderr)[-1]
    assert f": {bar_rate} records/s" in done.stdout, (done.stderr[-300:], done.stdout)
    assert summary == {"replies": 660, "sent": 660, "dups": 60, "errors": 0}
    assert await _ledger(database, opened[1]) == (600, 600, 600)


async def test_saturation_over_two_processes_into_given_sessions(
    servers: Servers, gateway: Gateway, tenant: Tenant, database: str, session_id: str
) -> None:
    """Saturation mode (no --rate), two worker processes, the session given by id."""
    _, summary = await _simulate(
        *("--url", _ws(servers), "--token", tenant.token(), "--session", session_id),
        *("--devices", "4", "--processes", "2", "--records", "1000", "--window", "50"),
        expect_rc=0,
    )
    assert summary == {"replies": 1000, "sent": 1000, "dups": 0, "errors": 0}
    assert await _ledger(database, session_id) == (1000, 1000, 1000)


async def test_another_users_session_is_reported_as_errors_and_nothing_stored(
    servers: Servers, gateway: Gateway, tenant: Tenant, database: str, session_id: str
) -> None:
    """A colleague's token on the owner's session: every reply is an error, the summary names
    its code, the exit code says so, and the ledger stays empty."""
    done, summary = await _simulate(
        *("--url", _ws(servers), "--sub", tenant.other_user, "--session", session_id),
        *("--devices", "2", "--records", "50"),
        expect_rc=1,
    )
    assert summary == {"replies": 50, "sent": 50, "dups": 0, "errors": 50}
    assert "50 errors (FORBIDDEN 50);" in done.stdout, done.stdout
    assert await _ledger(database, session_id) == (0, 0, 0)


async def test_errors_are_counted_by_code(
    servers: Servers, gateway: Gateway, tenant: Tenant, device: Device, session_id: str
) -> None:
    """Half the devices record into a closed session, half into one that does not exist: the
    summary tells the two codes apart."""
    closed = await device.request(f"sessions/{session_id}/close", {})
    assert closed["status"] == "success", closed
    missing = "sess_" + "0" * 20
    done, summary = await _simulate(
        *("--url", _ws(servers), "--sub", tenant.user),
        *("--session", session_id, "--session", missing, "--devices", "2", "--records", "20"),
        expect_rc=1,
    )
    assert summary == {"replies": 20, "sent": 20, "dups": 0, "errors": 20}
    codes = SUMMARY.search(done.stdout)
    assert codes and codes["codes"], done.stdout
    by_code = dict(item.rsplit(" ", 1) for item in codes["codes"].split(", "))
    assert by_code == {"SESSION_CLOSED": "10", "NOT_FOUND": "10"}, done.stdout


async def test_refused_open_and_unreachable_broker_say_what_to_do(
    servers: Servers, gateway: Gateway, tenant: Tenant
) -> None:
    """No traceback: one line naming the cause and what to check, and a non-zero exit."""
    refused = await run_cli(
        "simulate",
        "--url",
        _ws(servers),
        "--sub",
        tenant.user,
        "--project",
        "proj_that_does_not_exist",
        "--sector",
        tenant.sector_id,
        env=_env(),
    )
    assert refused.returncode == 1
    assert "cannot open a session in sector" in refused.stderr and "NOT_FOUND" in refused.stderr
    assert "Traceback" not in refused.stderr

    unreachable = await run_cli(
        "simulate",
        "--url",
        "ws://127.0.0.1:1/mqtt",
        "--sub",
        tenant.user,
        "--session",
        "whatever",
        "--records",
        "5",
        env=_env(),
    )
    assert unreachable.returncode == 1
    assert "Connection refused" in unreachable.stderr and "127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


async def test_bad_arguments_are_refused_before_connecting() -> None:
    cases = {
        ("--url", "http://example.com", "--sub", "u", "--session", "s"): "broker URL",
        ("--sub", "u", "--session", "s", "--devices", "1", "--processes", "2"): "--processes",
        ("--sub", "u", "--session", "s", "--duplicates", "1.5"): "--duplicates",
        ("--sub", "u", "--session", "s", "--rate", "-5"): "--rate",
        ("--sub", "u"): "give --session",
    }
    for args, expected in cases.items():
        done = await run_cli("simulate", *args, env=_env())
        assert done.returncode == 2, (args, done.stderr)
        assert expected in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_error_code_is_read_from_the_reply_without_parsing_it() -> None:
    """The summary's codes come from the bytes of an error reply as the gateway encodes it;
    a reply without a code is counted as ``unknown``."""
    reply = orjson.dumps(
        {"status": "error", "error": error_body(SessionClosed("closed")), "clientEventId": "e"}
    )
    assert error_code_of(reply) == "SESSION_CLOSED"
    assert error_code_of(b'{"status":"error"}') == "unknown"
    assert error_code_of(b"not json") == "unknown"
