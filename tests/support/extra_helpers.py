"""Helpers for the integration tests: a raw MQTT 5 client, database probes, fresh databases."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.devices import ReadingClient
from tests.support.servers import Servers

WAIT_S = 15.0
DEAD_LETTER_WAIT_S = 5.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def iso_ms(value: datetime) -> str:
    """``2025-10-19T08:00:00.000Z`` (UTC, milliseconds), as the seeds write instants."""
    value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


# --- MQTT ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """One message a RawClient saw."""

    topic: str
    payload: bytes
    correlation: bytes | None
    retain: bool

    def json(self) -> dict[str, Any]:
        data = orjson.loads(self.payload)
        assert isinstance(data, dict), data
        return data


class RawClient(ReadingClient):
    """A bare MQTT 5 client: publishes exactly what it is told (no Response Topic unless given)
    and collects what arrives on the filters it subscribes to."""

    def __init__(self, host: str, port: int, *, websockets: bool = False) -> None:
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=f"raw-{secrets.token_hex(4)}",
            protocol=aiomqtt.ProtocolVersion.V5,
            transport="websockets" if websockets else "tcp",
            websocket_path="/mqtt" if websockets else None,
            timeout=10,
        )
        self._inboxes: dict[str, asyncio.Queue[Received]] = {}

    def _take(self, msg: aiomqtt.Message) -> None:
        props = msg.properties
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        got = Received(str(msg.topic), _as_bytes(msg.payload), corr, bool(msg.retain))
        for pattern, queue in self._inboxes.items():
            if msg.topic.matches(pattern):
                queue.put_nowait(got)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        token: str | None = None,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
    ) -> None:
        props: Properties | None = None
        if token or response_topic or correlation:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if token:
                props.UserProperty = [("authorization", f"Bearer {token}")]
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation:
                props.CorrelationData = correlation
        await self._client.publish(topic, payload, qos=qos, properties=props)

    @contextlib.asynccontextmanager
    async def collect(self, topic_filter: str) -> AsyncIterator[asyncio.Queue[Received]]:
        queue: asyncio.Queue[Received] = asyncio.Queue()
        self._inboxes[topic_filter] = queue
        await self._client.subscribe(topic_filter, qos=1)
        try:
            yield queue
        finally:
            self._inboxes.pop(topic_filter, None)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.unsubscribe(topic_filter)


def _as_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes | bytearray):
        return bytes(payload)
    if payload is None:
        return b""
    return str(payload).encode()


async def next_message(
    queue: asyncio.Queue[Any], timeout: float = WAIT_S, *, what: str = "a message"
) -> Any:
    """The next item of ``queue``, failing the test (not hanging it) after ``timeout``."""
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except TimeoutError:
        raise AssertionError(f"no {what} within {timeout:g} s") from None


async def quiet_for(queue: asyncio.Queue[Any], seconds: float) -> list[Any]:
    """Everything that arrives on ``queue`` within ``seconds`` (expected: nothing)."""
    extra: list[Any] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                extra.append(await queue.get())
    return extra


# --- PostgreSQL -------------------------------------------------------------------------------


async def fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn)
    try:
        rows: list[Any] = await conn.fetch(sql, *args)
        return rows
    finally:
        await conn.close()


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def execute(dsn: str, sql: str, *args: Any) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        status: str = await conn.execute(sql, *args)
        return status
    finally:
        await conn.close()


@dataclass(frozen=True)
class Stored:
    """What the database holds for some companies: ledger rows and sessions."""

    records: int
    sessions: int


async def stored_for(dsn: str, company_ids: Sequence[str]) -> Stored:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetchval(
            "SELECT count(*) FROM production_records WHERE company_id = ANY($1::text[])",
            list(company_ids),
        )
        sessions = await conn.fetchval(
            "SELECT count(*) FROM production_sessions WHERE company_id = ANY($1::text[])",
            list(company_ids),
        )
    finally:
        await conn.close()
    return Stored(int(records), int(sessions))


async def wait_dead_letter(
    dsn: str,
    topic: str,
    reason: str,
    *,
    payload: bytes | None = None,
    timeout: float = DEAD_LETTER_WAIT_S,
) -> Mapping[str, Any]:
    """The dead letter of ``topic`` with ``reason`` (and, if given, that payload's leading
    bytes and size). They are written in the background, so this polls, up to ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen: list[Any] = []
    while True:
        seen = await fetch(
            dsn,
            """SELECT topic, reason, message, auth0_id, payload, payload_size, truncated
               FROM dead_letters WHERE topic = $1 ORDER BY id""",
            topic,
        )
        for row in seen:
            if row["reason"] != reason:
                continue
            if payload is not None and (
                row["payload_size"] != len(payload)
                or not payload.startswith(bytes(row["payload"]))
                or (len(row["payload"]) == 0 and payload)
            ):
                continue
            return dict(row)
        if loop.time() >= deadline:
            raise AssertionError(
                f"no dead letter ({reason}) for {topic} within {timeout:g} s; "
                f"found {[(r['reason'], r['message']) for r in seen]}"
            )
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def fresh_database(servers: Servers) -> AsyncIterator[str]:
    """An empty database (no schema) on the test server; dropped afterwards."""
    name = f"fresh_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    try:
        yield servers.dsn(name)
    finally:
        conn = await asyncpg.connect(servers.admin_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


# --- subprocesses -----------------------------------------------------------------------------


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment without any GATEWAY_* variable, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(values)
    return env


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_cli(
    *args: str, env: Mapping[str, str], timeout: float = 120, cwd: Path | None = None
) -> Completed:
    """``python -m gateway.cli ARGS`` to completion (killed, and failed, past ``timeout``)."""
    return await run_process(
        [sys.executable, "-m", "gateway.cli", *args], env=env, timeout=timeout, cwd=cwd
    )


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> Completed:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=dict(env) if env is not None else None,
        cwd=str(cwd or PROJECT_ROOT),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(
            f"{' '.join(argv[:4])} ... did not finish within {timeout:g} s\n"
            f"stdout: {out.decode(errors='replace')[-2000:]}\n"
            f"stderr: {err.decode(errors='replace')[-2000:]}"
        ) from None
    assert proc.returncode is not None
    return Completed(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"))
