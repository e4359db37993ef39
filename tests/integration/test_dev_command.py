"""``gateway dev`` (SPEC §6): from nothing to a reply with the printed commands, then Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import jwt
import pytest

from gateway.devmode import _start_racing
from gateway.devstack import MosquittoServer, listens_beyond_loopback, listens_on
from gateway.errors import ConfigError
from tests.conftest import gateway_settings, running_gateway
from tests.support.extra_helpers import (
    PROJECT_ROOT,
    RawClient,
    Received,
    clean_env,
    next_message,
    run_process,
)
from tests.support.servers import Servers

START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 60


@dataclass
class DevRun:
    """A running ``gateway dev`` and what it printed."""

    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    def commands(self, program: str) -> list[str]:
        return [ln.strip() for ln in self.lines if ln.startswith(f"  {program} ")]

    def port_after(self, pattern: str) -> int:
        for line in self.lines:
            m = re.search(pattern, line)
            if m:
                return int(m.group(1))
        raise AssertionError(f"{pattern!r} not found in the output:\n" + "\n".join(self.lines))


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        frontier += kids
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.asynccontextmanager
async def gateway_dev(tmp_path: Path, *options: str) -> AsyncIterator[DevRun]:
    """Start ``gateway dev``; read its output up to "Ctrl-C stops"; clean up whatever remains."""
    stderr = (tmp_path / "dev.stderr").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "dev",
        *options,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
        stdin=asyncio.subprocess.DEVNULL,
        env=clean_env(),
        cwd=str(PROJECT_ROOT),
    )
    run = DevRun(proc)
    children: list[int] = []
    drain: asyncio.Task[None] | None = None
    try:
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                while True:
                    raw = await proc.stdout.readline()
                    if not raw:
                        raise AssertionError(
                            "gateway dev ended before it was ready:\n"
                            + "\n".join(run.lines)
                            + (tmp_path / "dev.stderr").read_text(errors="replace")[-3000:]
                        )
                    run.lines.append(raw.decode(errors="replace").rstrip("\n"))
                    if "Ctrl-C stops" in run.lines[-1]:
                        break
        except TimeoutError:
            raise AssertionError(
                f"gateway dev printed no 'Ctrl-C stops' within {START_TIMEOUT_S} s:\n"
                + "\n".join(run.lines)
            ) from None
        children = descendants(proc.pid)

        async def keep_reading() -> None:
            assert proc.stdout is not None
            while raw := await proc.stdout.readline():
                run.lines.append(raw.decode(errors="replace").rstrip("\n"))

        drain = asyncio.create_task(keep_reading())
        yield run
    finally:
        if proc.returncode is None:
            children = children or descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in children:
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if drain is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(drain, 10)
            drain.cancel()
        stderr.close()


async def test_gateway_dev_keep_leaves_the_broker_and_database_files(tmp_path: Path) -> None:
    """--keep: after Ctrl-C the broker's folder and the PostgreSQL cluster (which lives apart
    when run as root) are both still there, and the output says where."""
    async with gateway_dev(tmp_path, "--keep") as dev:
        pass
    kept = [ln for ln in dev.lines if "data kept in " in ln]
    assert kept, dev.lines
    found = re.search(r"data kept in (\S+) \(PostgreSQL cluster: (\S+)\)", kept[0])
    assert found, kept
    workdir, cluster = Path(found[1]), Path(found[2])
    try:
        assert (workdir / "mosquitto").is_dir()
        assert (cluster / "PG_VERSION").is_file()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(
            cluster.parent if cluster.parent.name.startswith("hydrobit-pg-") else cluster,
            ignore_errors=True,
        )


async def test_gateway_dev_end_to_end(tmp_path: Path) -> None:
    """The printed commands work as printed (record, replay, HEAD check); Ctrl-C stops all."""
    async with gateway_dev(tmp_path) as dev:
        subs = dev.commands("mosquitto_sub")
        pubs = dev.commands("mosquitto_pub")
        assert subs, dev.lines
        assert "-t 'hydrobit/v2/#'" in subs[0]
        broker_port = int(re.findall(r"-p (\d+)", subs[0])[0])
        pg_port = dev.port_after(r"PostgreSQL on 127\.0\.0\.1:(\d+)")
        ws_port = dev.port_after(r"ws://127\.0\.0\.1:(\d+)/mqtt")
        record_pub = next(p for p in pubs if "/records'" in p)
        topic = shlex.split(record_pub)[shlex.split(record_pub).index("-t") + 1]
        assert re.fullmatch(r"hydrobit/v2/sessions/[^/]+/records", topic), topic
        curl = [ln for ln in dev.lines if "curl " in ln or "check-idempotency?key=" in ln]
        url = re.findall(r"'(http://[^']+check-idempotency\?key=[^']+)'", "\n".join(curl))[0]
        auth = re.findall(r"-H '(Authorization: Bearer [^']+)'", "\n".join(curl))[0]
        http_port = int(re.findall(r"http://127\.0\.0\.1:(\d+)/", url)[0])
        ports = {broker_port, ws_port, pg_port, http_port}
        assert len(ports) == 4
        for port in ports:
            assert accepts(port), port

        async with (
            RawClient("127.0.0.1", broker_port) as watcher,
            watcher.collect("hydrobit/v2/#") as everything,
        ):
            replies: list[dict[str, object]] = []
            for attempt in range(2):
                done = await run_process(shlex.split(record_pub), timeout=30)
                assert done.returncode == 0, (attempt, done)
                while True:
                    got: Received = await next_message(
                        everything, what=f"the reply to publish #{attempt + 1}"
                    )
                    if got.topic == f"{topic}/reply":
                        replies.append(got.json())
                        break
        first, second = replies
        assert first["status"] == "success", first
        assert second["status"] == "success", second
        first_data = first["data"]
        second_data = second["data"]
        assert isinstance(first_data, dict)
        assert isinstance(second_data, dict)
        assert first_data["idempotent"] is False
        assert second_data["idempotent"] is True
        assert second_data["recordId"] == first_data["recordId"]
        assert first["requestId"] == "demo-1"

        header_name, _, header_value = auth.partition(": ")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async with http.head(url, headers={header_name: header_value}) as resp:
                assert resp.status == 200
            unknown = url.rsplit(":", 1)[0] + ":evt_never_sent"
            async with http.head(unknown, headers={header_name: header_value}) as resp:
                assert resp.status == 404
            async with http.head(url) as resp:
                assert resp.status == 401

        children = descendants(dev.proc.pid)
        assert len(children) >= 2, children  # the broker and the database
        dev.proc.send_signal(signal.SIGINT)
        try:
            code = await asyncio.wait_for(dev.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"gateway dev did not stop within {STOP_TIMEOUT_S} s") from None
        assert code == 0
        still = [pid for pid in children if alive(pid)]
        assert still == [], f"left running after Ctrl-C: {still}"
        for port in ports:
            assert not accepts(port), f"port {port} still accepts connections after Ctrl-C"


@contextlib.contextmanager
def ports_taken(*ports: int) -> Iterator[None]:
    """Hold ``ports`` on loopback (those another process holds are taken already)."""
    held: list[socket.socket] = []
    try:
        for port in ports:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", port))
                s.listen()
            except OSError:
                s.close()
                continue
            held.append(s)
        yield
    finally:
        for s in held:
            s.close()


async def test_gateway_dev_falls_back_to_free_ports(tmp_path: Path) -> None:
    """With 1883, 9001 and 8080 taken, dev picks free ports, prints them, and they work."""
    preferred = {1883, 9001, 8080}
    with ports_taken(*preferred):
        async with gateway_dev(tmp_path) as dev:
            pubs = dev.commands("mosquitto_pub")
            open_pub = next(p for p in pubs if "/sessions/open'" in p)
            broker_port = int(re.findall(r"-p (\d+)", open_pub)[0])
            ws_port = dev.port_after(r"ws://127\.0\.0\.1:(\d+)/mqtt")
            http_port = dev.port_after(r"http://127\.0\.0\.1:(\d+)/api/")
            assert not {broker_port, ws_port, http_port} & preferred, dev.lines
            token = next(ln for ln in dev.lines if "Token (24 h):" in ln)
            claims = jwt.decode(
                token.split("Token (24 h):")[1].strip(), options={"verify_signature": False}
            )
            assert claims["sub"] == "user_123456789"
            assert 23 * 3600 < claims["exp"] - claims["iat"] <= 24 * 3600
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
                http.get(f"http://127.0.0.1:{http_port}/readyz") as resp,
            ):
                assert resp.status == 200
            async with (
                RawClient("127.0.0.1", broker_port) as watcher,
                watcher.collect("hydrobit/v2/sessions/open/reply") as replies,
            ):
                done = await run_process(shlex.split(open_pub), timeout=30)
                assert done.returncode == 0, done
                reply = (await next_message(replies, what="the open reply")).json()
            assert reply["status"] == "success", reply


async def test_gateway_dev_printed_open_replies(tmp_path: Path) -> None:
    """The printed open command re-opens the demo session: the same session, idempotent; the
    printed environment lets token, dead-letters and simulate work on the dev stack."""
    async with gateway_dev(tmp_path) as dev:
        pubs = dev.commands("mosquitto_pub")
        open_pub = next(p for p in pubs if "/sessions/open'" in p)
        record_pub = next(p for p in pubs if "/records'" in p)
        session_topic = shlex.split(record_pub)[shlex.split(record_pub).index("-t") + 1]
        session_id = session_topic.split("/")[3]
        broker_port = int(re.findall(r"-p (\d+)", open_pub)[0])
        async with (
            RawClient("127.0.0.1", broker_port) as watcher,
            watcher.collect("hydrobit/v2/sessions/open/reply") as replies,
        ):
            done = await run_process(shlex.split(open_pub), timeout=30)
            assert done.returncode == 0, done
            reply = (await next_message(replies, what="the open reply")).json()
        assert reply["status"] == "success", reply
        assert reply["data"]["sessionId"] == session_id
        assert reply["data"]["idempotent"] is True
        assert reply["requestId"] == "open-1"

        export = next(ln.strip() for ln in dev.lines if ln.startswith("  export GATEWAY_"))
        printed = dict(word.split("=", 1) for word in shlex.split(export)[1:])
        assert set(printed) == {
            "GATEWAY_DATABASE_URL",
            "GATEWAY_MQTT_URL",
            "GATEWAY_JWT_SECRET",
            # the README's examples use $TOKEN, $SESSION, $MQTT_PORT, $WS_URL, $HTTP_URL
            "TOKEN",
            "SESSION",
            "MQTT_PORT",
            "WS_URL",
            "HTTP_URL",
        }
        assert printed["SESSION"] == session_id
        ws_port = dev.port_after(r"devices: ws://127\.0\.0\.1:(\d+)/mqtt")
        assert printed["WS_URL"] == f"ws://127.0.0.1:{ws_port}/mqtt"
        assert jwt.decode(printed["TOKEN"], printed["GATEWAY_JWT_SECRET"], algorithms=["HS256"])
        assert int(printed["MQTT_PORT"]) == broker_port
        http_port = dev.port_after(r"HTTP sidecar: http://127\.0\.0\.1:(\d+) ")
        assert printed["HTTP_URL"] == f"http://127.0.0.1:{http_port}"
        env = clean_env(**printed)

        def command(name: str) -> list[str]:
            line = next(ln.strip() for ln in dev.lines if re.match(rf"  \S*gateway {name} ", ln))
            return shlex.split(line, comments=True)  # as a shell reads it

        minted = await run_process(command("token"), env=env, timeout=30)
        assert minted.returncode == 0, minted
        claims = jwt.decode(
            minted.stdout.strip(), printed["GATEWAY_JWT_SECRET"], algorithms=["HS256"]
        )
        assert claims["sub"] == "user_123456789"
        seeded = await run_process(command("seed"), env=env, timeout=30)
        assert seeded.returncode == 0, seeded  # the printed file exists and loads (again)
        assert "seeded 1 companies, 1 users, 1 projects, 1 sectors" in seeded.stdout, seeded
        listed = await run_process(command("dead-letters"), env=env, timeout=30)
        assert listed.returncode == 0, listed
        simulate = command("simulate")
        simulate[simulate.index("--records") + 1] = "40"
        assert simulate[simulate.index("--session") + 1] == session_id
        simulated = await run_process(simulate, env=env, timeout=120)
        assert simulated.returncode == 0, simulated
        assert "40/40 answered" in simulated.stdout, simulated.stdout


def test_listens_beyond_loopback_tells_loopback_from_every_interface() -> None:
    """What dev's warning about mosquitto 2.0.11's WebSocket listener relies on."""
    for host, beyond in (("127.0.0.1", False), ("0.0.0.0", True)):
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            assert not listens_beyond_loopback(port)  # bound, not yet listening
            s.listen()
            assert listens_beyond_loopback(port) is beyond, host


async def test_a_port_taken_after_it_was_found_free_is_replaced(
    servers: Servers, database: str, tmp_path: Path
) -> None:
    """Two `gateway dev` starting together: a port found free and then taken by the other
    process gets a free one instead of stopping the stack (broker, PostgreSQL, HTTP sidecar)."""
    with socket.socket() as taken, socket.socket() as taken_ws:
        for s in (taken, taken_ws):
            s.bind(("127.0.0.1", 0))
            s.listen()
        port, ws_port = (int(s.getsockname()[1]) for s in (taken, taken_ws))
        # both taken, as by another `gateway dev`: something answers on each, but not our broker
        broker = MosquittoServer(tmp_path, tcp_port=port, ws_port=ws_port)
        try:
            _start_racing(broker, "tcp_port", "ws_port")
            assert broker.running
            assert (broker.tcp_port, broker.ws_port) != (port, ws_port)
            assert accepts(broker.tcp_port)
            pid = broker.pid
            assert pid is not None
            assert listens_on(pid, broker.tcp_port) and listens_on(pid, broker.ws_port)
        finally:
            broker.stop()
        # a prefix of its own: a stopped gateway's persistent session would otherwise keep a
        # share of the shared gateway's requests
        prefix = f"hb-devport-{secrets.token_hex(3)}/v2"
        settings = gateway_settings(servers, database, http_port=port, topic_prefix=prefix)
        async with running_gateway(settings, any_http_port=True) as gw:
            assert gw.http_port not in (None, port)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{gw.http_port}/healthz") as response,
            ):
                assert response.status == 200
        with pytest.raises(ConfigError, match="GATEWAY_HTTP_PORT"):
            async with running_gateway(settings):
                pass
