"""``gateway dev``: the embedded default of SPEC §6, from nothing to a reply in one command."""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import yaml

from gateway.config import Settings, load_settings
from gateway.core.auth import mint_token
from gateway.core.models import OpenSession
from gateway.core.rules import Limits, Principal
from gateway.core.seedfile import SeedFile
from gateway.devstack import (
    DevStackError,
    MosquittoServer,
    PostgresServer,
    free_port,
    listens_beyond_loopback,
    port_free,
)
from gateway.logs import setup_logging

DEMO_USER = "user_123456789"
DEMO_SEED = {
    "companies": [{"companyId": "comp_12345", "name": "Demo Farms"}],
    "users": [{"auth0Id": DEMO_USER, "companyId": "comp_12345"}],
    "projects": [
        {
            "projectId": "proj_123",
            "companyId": "comp_12345",
            "name": "Berries 2025",
            "timezone": "America/Mexico_City",
            "samplingUnit": "box",
            "pricePerUnit": 5.5,
            "bonus": {"type": "percent", "value": 10, "note": "High quality bonus"},
            "maxDurationHours": 12,
            "sectors": [{"sectorId": "sector_001", "sector_name": "Lote A-1"}],
        }
    ],
}


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _prepare(settings: Settings) -> str:
    """Migrate, seed the demo tenant and open a demo session; return its id."""
    from gateway.service import Service
    from gateway.store.migrate import migrate
    from gateway.store.postgres import PostgresStore

    await migrate(settings.database_url)
    store = await PostgresStore.connect(settings.database_url, max_size=2)
    try:
        await store.seed(SeedFile.model_validate(DEMO_SEED))
        service = Service(store, Limits())
        who = Principal(DEMO_USER, "comp_12345")
        now = datetime.now(UTC)
        opened = await service.open_session(
            who,
            OpenSession.model_validate({"projectId": "proj_123", "sectorId": "sector_001"}),
            now,
        )
        return str(opened["sessionId"])
    finally:
        await store.close()


def write_demo_seed(folder: Path) -> Path:
    """The demo tenant as a seed file (SPEC §6 format), for `gateway seed` to load or copy."""
    path = folder / "tenants.yaml"
    header = (
        "# A seed file for `gateway seed` (YAML, or the same structure in JSON); loading it\n"
        "# twice changes nothing. This is the demo tenant `gateway dev` loaded: copy it, add\n"
        "# companies, users, projects and sectors, and load it again.\n"
    )
    path.write_text(header + yaml.safe_dump(DEMO_SEED, sort_keys=False), encoding="utf-8")
    return path


def dev_token(settings: Settings, sub: str, ttl_s: int) -> str:
    """An HS256 token for ``sub`` that this configuration's gateway accepts (its audience and
    issuer included, when set): what `gateway dev`, `gateway token` and `gateway simulate
    --sub` print or use."""
    assert settings.jwt_secret
    return mint_token(
        settings.jwt_secret,
        sub,
        ttl_s=ttl_s,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
    )


def _instructions(
    settings: Settings, mqtt_port: int, ws_port: int, session_id: str, seed_file: Path
) -> str:
    token = dev_token(settings, DEMO_USER, 24 * 3600)
    p = settings.topic_prefix
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    auth = f"Bearer {token}"
    record = (
        '{"workerId":"JS0315","worker_name":"John Smith","units":5,'
        f'"recordedAtUtc":"{now}","clientEventId":"evt_demo_0001","requestId":"demo-1"}}'
    )
    open_payload = '{"projectId":"proj_123","sectorId":"sector_001","requestId":"open-1"}'
    base = f"-h 127.0.0.1 -p {mqtt_port} -V mqttv5"
    pub = f"mosquitto_pub {base} -q 1 -D publish user-property authorization {shlex.quote(auth)}"
    key = f"client:{session_id}:JS0315:evt_demo_0001"
    http = f"http://127.0.0.1:{settings.http_port}"
    ws = f"ws://127.0.0.1:{ws_port}/mqtt"
    env = " ".join(
        f"{name}={shlex.quote(value)}"
        for name, value in (
            ("GATEWAY_DATABASE_URL", settings.database_url),
            ("GATEWAY_MQTT_URL", f"mqtt://127.0.0.1:{mqtt_port}"),
            ("GATEWAY_JWT_SECRET", settings.jwt_secret or ""),
            # checked when set: `gateway token` in that shell must mint what this stack accepts
            *((("GATEWAY_JWT_AUDIENCE", settings.jwt_audience),) if settings.jwt_audience else ()),
            *((("GATEWAY_JWT_ISSUER", settings.jwt_issuer),) if settings.jwt_issuer else ()),
            # as $TOKEN, $SESSION, $MQTT_PORT, $WS_URL and $HTTP_URL in the README's examples
            ("TOKEN", token),
            ("SESSION", session_id),
            ("MQTT_PORT", str(mqtt_port)),
            ("WS_URL", ws),
            ("HTTP_URL", http),
        )
    )
    gw = _program()
    return "\n".join(
        [
            "",
            "Hydrobit gateway (dev) is running. In a second terminal:",
            "",
            "  # 1. watch everything: replies, events, retained state",
            f"  mosquitto_sub {base} -t '{p}/#' -v",
            "",
            "  # 2. record 5 boxes for worker JS0315 in the demo session (publish it twice:",
            '  #    the second reply says "idempotent": true)',
            f"  {pub} -t '{p}/sessions/{session_id}/records' -m '{record}'",
            "",
            "  # open (or re-open: same owner gets the same session back) the demo session",
            f"  {pub} -t '{p}/sessions/open' -m '{open_payload}'",
            "",
            "  # 3. the HEAD idempotency check: 200 for the key above, 404 for an unknown one",
            f"  curl -I -H 'Authorization: {auth}' \\",
            f"    '{http}/api/control/production/records/check-idempotency?key={key}'",
            "",
            "  # 4. the other commands (token, seed, dead-letters, simulate) on this stack:",
            f"  export {env}",
            f"  {gw} token --sub {DEMO_USER} --ttl 1h",
            f"  {gw} seed {shlex.quote(str(seed_file))}   # the demo tenant: copy it, edit, load",
            f"  {gw} dead-letters --since 1h",
            f"  {gw} simulate --url {ws} --sub {DEMO_USER} --session {session_id} "
            "--records 2000 --rate 500",
            "",
            f"Demo user {DEMO_USER}, session {session_id}.",
            f"Broker: mqtt://127.0.0.1:{mqtt_port} (devices: ws://127.0.0.1:{ws_port}/mqtt)",
            f"HTTP sidecar: {http} (/healthz, /readyz, /metrics, /api/control/production/...)",
            *(
                [
                    f"Warning: this mosquitto listens for WebSocket on every interface (port "
                    f"{ws_port}; mosquitto 2.0.11 ignores the loopback address) and the demo "
                    "broker lets anyone in: use it on a trusted network, or firewall that port.",
                ]
                if listens_beyond_loopback(ws_port)
                else []
            ),
            f"Token (24 h): {token}",
            "Ctrl-C stops the gateway, the broker and the database.",
            "",
        ]
    )


def _program() -> str:
    """How to call ``gateway`` from here: the virtualenv's script when it is not on PATH."""
    script = Path(sys.executable).parent / "gateway"
    if not script.is_file() or shutil.which("gateway") == str(script):
        return "gateway"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _start_racing(server: PostgresServer | MosquittoServer, *ports: str) -> None:
    """Start a server on ports found free a moment ago; when another process took one meanwhile
    (two `gateway dev` starting together), start it again on other free ports."""
    for attempt in range(3):
        try:
            server.start()
            return
        except DevStackError:
            if attempt == 2 or all(port_free(getattr(server, port)) for port in ports):
                raise
            for port in ports:
                setattr(server, port, free_port())


def run_dev(*, keep: bool = False) -> int:
    base = load_settings()
    setup_logging(
        base.log_level, "text" if "GATEWAY_LOG_FORMAT" not in os.environ else base.log_format
    )
    workdir = Path(tempfile.mkdtemp(prefix="hydrobit-dev-"))
    pg = PostgresServer(workdir)
    broker = MosquittoServer(workdir, tcp_port=free_port(1883), ws_port=free_port(9001))
    try:
        try:
            _say("starting PostgreSQL ...")
            _start_racing(pg, "port")
            dsn = pg.create_database("hydrobit")
            _say(f"PostgreSQL on 127.0.0.1:{pg.port}; starting Mosquitto ...")
            _start_racing(broker, "tcp_port", "ws_port")
        except DevStackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        settings = load_settings(
            database_url=dsn,
            mqtt_url=broker.url,
            http_port=free_port(base.http_port),
            jwt_secret=base.jwt_secret or secrets.token_hex(32),
            mqtt_client_id=f"hydrobit-gateway-dev-{os.getpid()}",
        )
        return asyncio.run(_serve(settings, broker, workdir))
    except KeyboardInterrupt:
        return 0
    finally:
        _say("stopping Mosquitto and PostgreSQL ...")
        broker.stop()
        if keep:  # for a look afterwards (postgres -D <cluster>), not to start again from
            pg.stop()
            _say(f"data kept in {workdir} (PostgreSQL cluster: {pg.data_dir})")
        else:
            pg.remove()
            shutil.rmtree(workdir, ignore_errors=True)


async def _serve(settings: Settings, broker: MosquittoServer, workdir: Path) -> int:
    from gateway.app import Gateway
    from gateway.cli import install_signal_handlers

    session_id = await _prepare(settings)
    seed_file = write_demo_seed(workdir)
    gateway = Gateway(settings, any_http_port=True)
    install_signal_handlers(gateway.stop)
    await gateway.run(
        on_started=lambda g: _say(
            _instructions(
                settings.model_copy(update={"http_port": g.http_port or settings.http_port}),
                broker.tcp_port,
                broker.ws_port,
                session_id,
                seed_file,
            )
        )
    )
    return 0
