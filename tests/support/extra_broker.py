"""A hardened broker for tests: mosquitto from ``mosquitto/production.conf`` on loopback ports,
with a password file, the project's ACL, a private CA and TLS listeners; and MQTT 5 clients that
log in with a username and password and report the broker's reason codes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.devstack import MosquittoServer
from tests.support.devices import ReadingClient

PREFIX = "hydrobit/v2"  # fixed by mosquitto/acl
WAIT_S = 15.0

# the users of the tests; their rights come from mosquitto/acl
USERS = {
    "hydrobit-gateway": "gw-" + secrets.token_hex(8),
    "operator": "op-" + secrets.token_hex(8),
    "device-a": "da-" + secrets.token_hex(8),
    "device-b": "db-" + secrets.token_hex(8),
}

Transport = Literal["tcp", "ws", "mqtts", "wss"]


# --- files --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A private CA and a server certificate, under the names production.conf uses."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    def client_context(self) -> ssl.SSLContext:
        """What a client trusting only this CA uses (hostname checked)."""
        return ssl.create_default_context(cafile=str(self.ca))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def make_certificates(
    folder: Path,
    *,
    dns_names: tuple[str, ...] = ("localhost",),
    ips: tuple[str, ...] = ("127.0.0.1",),
) -> Certificates:
    """A private CA (``ca.crt``) and a server certificate (``server.crt``, ``server.key``) for the
    given names, as the openssl commands of mosquitto/README.md make them."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Hydrobit test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certificates(folder)
    certs.ca.write_bytes(_pem(ca))
    certs.cert.write_bytes(_pem(server))
    certs.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    certs.key.chmod(0o600)
    return certs


def mosquitto_passwd_binary() -> str | None:
    return shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if Path("/usr/bin/mosquitto_passwd").is_file() else None
    )


def make_password_file(path: Path, users: Mapping[str, str]) -> Path:
    """A mosquitto password file (hashed entries), made with ``mosquitto_passwd -b``."""
    binary = mosquitto_passwd_binary()
    if binary is None:
        raise FileNotFoundError("mosquitto_passwd not found (package mosquitto)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for i, (user, password) in enumerate(users.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(
            [binary, *flags, "-b", str(path), user, password], check=True, capture_output=True
        )
    path.chmod(0o600)
    return path


@contextlib.contextmanager
def secure_broker(base: Path, users: Mapping[str, str] = USERS) -> Iterator[SecureBroker]:
    """mosquitto from production.conf: password file, ACL, TLS listeners on free loopback ports."""
    certs = make_certificates(base / "certs")
    passwd = make_password_file(base / "passwd", users)
    server = MosquittoServer(
        base / "mq", config_name="production.conf", certs_dir=certs.folder, password_file=passwd
    )
    server.start()
    try:
        yield SecureBroker(server, certs)
    finally:
        server.stop()


@dataclass(frozen=True)
class SecureBroker:
    server: MosquittoServer
    certs: Certificates
    host: str = "127.0.0.1"

    def port(self, transport: Transport) -> int:
        return {
            "tcp": self.server.tcp_port,
            "ws": self.server.ws_port,
            "mqtts": self.server.tls_port,
            "wss": self.server.wss_port,
        }[transport]

    def url(self, transport: Transport) -> str:
        return {
            "tcp": self.server.url,
            "ws": self.server.ws_url,
            "mqtts": self.server.tls_url,
            "wss": self.server.wss_url,
        }[transport]

    def client(
        self,
        username: str | None,
        *,
        password: str | None = None,
        client_id: str | None = None,
        transport: Transport = "tcp",
        trust: ssl.SSLContext | None = None,
    ) -> BrokerUser:
        """An MQTT 5 client logging in as ``username`` (its password from USERS unless given);
        over mqtts/wss it trusts the private CA unless ``trust`` says otherwise."""
        if username is not None and password is None:
            password = USERS[username]
        tls = None
        if transport in ("mqtts", "wss"):
            tls = trust or self.certs.client_context()
        return BrokerUser(
            self.host,
            self.port(transport),
            username=username,
            password=password,
            client_id=client_id or username or f"anon-{secrets.token_hex(4)}",
            websockets=transport in ("ws", "wss"),
            tls=tls,
        )


# --- clients ------------------------------------------------------------------------------------


def reason_code(value: Any) -> int:
    """paho's ReasonCode (MQTT 5) or plain int, as an int."""
    return int(value.value) if hasattr(value, "value") else int(value)


def props(**values: Any) -> Properties:
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in values.items():
        setattr(p, key, value)
    return p


class BrokerUser(ReadingClient):
    """An MQTT 5 client with a username and password. ``publish`` returns the PUBACK reason code;
    everything that arrives on its subscriptions lands in ``inbox``, in order."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        username: str | None,
        password: str | None,
        client_id: str,
        websockets: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client_id = client_id
        self.inbox: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._client = aiomqtt.Client(
            host,
            port,
            username=username,
            password=password,
            identifier=client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            transport="websockets" if websockets else "tcp",
            websocket_path="/mqtt" if websockets else None,
            tls_context=tls,
            timeout=10,
        )
        # aiomqtt drops the PUBACK reason code: keep it (publishes are awaited one at a time)
        self._pubacks: asyncio.Queue[int] = asyncio.Queue()
        paho = self._client._client
        forward: Any = paho.on_publish

        def on_publish(client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
            self._pubacks.put_nowait(reason_code(reason))
            forward(client, userdata, mid, reason, properties)

        paho.on_publish = on_publish

    def _take(self, msg: aiomqtt.Message) -> None:
        self.inbox.put_nowait(msg)

    async def subscribe(self, *filters: str) -> list[int]:
        """Subscribe (QoS 1); the SUBACK reason codes, one per filter."""
        codes = []
        for f in filters:
            result = await self._client.subscribe(f, qos=1)
            codes += [reason_code(r) for r in result]
        return codes

    async def publish(
        self,
        topic: str,
        payload: bytes | dict[str, Any],
        *,
        properties: Properties | None = None,
        retain: bool = False,
    ) -> int:
        """Publish at QoS 1 and return the broker's PUBACK reason code (0 = accepted)."""
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        while not self._pubacks.empty():
            self._pubacks.get_nowait()
        await self._client.publish(topic, body, qos=1, retain=retain, properties=properties)
        return await asyncio.wait_for(self._pubacks.get(), WAIT_S)

    async def request(
        self, suffix: str, payload: dict[str, Any], *, token: str, reply_topic: str | None = None
    ) -> tuple[int, bytes]:
        """Publish a request the way a handheld does (Response Topic under
        ``P/clients/<client id>/``, Correlation Data, bearer token): (PUBACK code, correlation)."""
        corr = secrets.token_hex(8).encode()
        p = props(
            ResponseTopic=reply_topic or f"{PREFIX}/clients/{self.client_id}/replies",
            CorrelationData=corr,
        )
        p.UserProperty = [("authorization", f"Bearer {token}")]
        return await self.publish(f"{PREFIX}/{suffix}", payload, properties=p), corr

    async def until(self, topic: str, *, timeout: float = WAIT_S) -> list[aiomqtt.Message]:
        """Everything received up to and including the first message on ``topic``."""
        seen: list[aiomqtt.Message] = []
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.inbox.get()
                seen.append(msg)
                if str(msg.topic) == topic:
                    return seen

    async def reply(self, correlation: bytes, *, timeout: float = WAIT_S) -> dict[str, Any]:
        """The reply carrying ``correlation`` (other messages are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.inbox.get()
                if correlation_of(msg) == correlation:
                    data = orjson.loads(msg.payload)
                    assert isinstance(data, dict), data
                    return data


def correlation_of(msg: aiomqtt.Message) -> bytes | None:
    """The message's MQTT 5 Correlation Data, if it carries one."""
    corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
    return bytes(corr) if corr is not None else None


def live_topics(messages: list[aiomqtt.Message]) -> list[str]:
    """The topics of messages published while subscribed (retained ones sent on subscribing,
    left by earlier tests, are skipped)."""
    return [str(m.topic) for m in messages if not m.retain]


async def connect_refusal(client: BrokerUser) -> int | None:
    """The CONNACK reason code when the broker refuses ``client``; None if it was accepted."""
    try:
        async with client:
            return None
    except aiomqtt.MqttCodeError as exc:
        if exc.rc is None:
            raise
        return reason_code(exc.rc)
