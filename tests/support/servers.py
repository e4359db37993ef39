"""Real PostgreSQL and Mosquitto for the test session: testcontainers when a Docker engine
answers, else local binaries (the same code ``gateway dev`` uses) on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.devstack import MosquittoServer, PostgresServer
from gateway.resources import data_dir

MOSQUITTO_IMAGE = "eclipse-mosquitto:2.0.20"
POSTGRES_IMAGE = "postgres:16-alpine"


@dataclass
class Servers:
    """Where the test servers listen, and handles to stop or restart them."""

    admin_dsn: str  # a superuser DSN to the maintenance database
    mqtt_host: str
    mqtt_port: int
    ws_port: int
    postgres: PostgresServer | None = None
    mosquitto: MosquittoServer | None = None

    def dsn(self, database: str) -> str:
        return self.admin_dsn.rsplit("/", 1)[0] + f"/{database}"

    @property
    def mqtt_url(self) -> str:
        return f"mqtt://{self.mqtt_host}:{self.mqtt_port}"


def docker_available() -> bool:
    """Does a Docker engine answer ``/_ping``? (Probed by hand: docker-py leaks its socket.)"""
    if os.environ.get("HYDROBIT_TEST_NO_DOCKER"):
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            name, _, port = host.removeprefix("tcp://").partition(":")
            address = (name, int(port or 2375))
        else:
            return False
        with sock:
            sock.settimeout(3)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in sock.recv(256)
    except OSError:
        return False


@contextlib.contextmanager
def local_servers(base: Path) -> Iterator[Servers]:
    pg = PostgresServer(base / "pg")
    broker = MosquittoServer(base / "mq")
    pg.start()
    try:
        broker.start()
        try:
            yield Servers(
                admin_dsn=pg.dsn("postgres"),
                mqtt_host="127.0.0.1",
                mqtt_port=broker.tcp_port,
                ws_port=broker.ws_port,
                postgres=pg,
                mosquitto=broker,
            )
        finally:
            broker.stop()
    finally:
        pg.remove()


@contextlib.contextmanager
def container_servers(base: Path) -> Iterator[Servers]:  # pragma: no cover - needs Docker
    from testcontainers.community.mqtt import MosquittoContainer
    from testcontainers.community.postgres import PostgresContainer

    from gateway.devstack import render_mosquitto_config

    conf = base / "mosquitto.conf"
    conf.write_text(
        render_mosquitto_config(
            data_dir("mosquitto") / "mosquitto.conf",
            tcp_port=1883,
            ws_port=9001,
            state_dir=Path("/mosquitto/data"),
            as_root=False,
        ).replace("127.0.0.1", "0.0.0.0")
    )
    with PostgresContainer(POSTGRES_IMAGE, driver=None) as pg:
        broker: Any = MosquittoContainer(MOSQUITTO_IMAGE).with_exposed_ports(1883, 9001)
        with broker.start(configfile=str(conf)) as mq:
            yield Servers(
                admin_dsn=pg.get_connection_url(),
                mqtt_host=mq.get_container_host_ip(),
                mqtt_port=int(mq.get_exposed_port(1883)),
                ws_port=int(mq.get_exposed_port(9001)),
            )


def start_servers(base: Path) -> contextlib.AbstractContextManager[Servers]:
    return container_servers(base) if docker_available() else local_servers(base)
