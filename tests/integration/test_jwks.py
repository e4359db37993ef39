"""GATEWAY_JWT_JWKS end to end: a JWKS served over loopback http (or a file), RS256 and ES256
tokens from devices over MQTT 5, the refusals of SPEC §3, and a key rotated in at run time."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

import gateway.jwks
from gateway.app import Gateway, verifier_from
from gateway.errors import ConfigError
from gateway.jwks import load_keys
from gateway.store.postgres import PostgresStore
from tests.conftest import create_database, gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant

PREFIX = "hb-jwks/v2"
AUDIENCE = "hydrobit-gateway"
ISSUER = "https://idp.hydrobit.test/"
POLL_ATTEMPTS = 100
POLL_PAUSE_S = 0.1


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class Signer:
    """A private key and the kid under which its public half is published."""

    kid: str
    alg: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @property
    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            out = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            out = ECAlgorithm.to_jwk(public, as_dict=True)
        return {**out, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, sub: str, *, kid: str | None = None, **overrides: Any) -> str:
        """A token for ``sub`` accepted by the gateway unless ``overrides`` spoil it."""
        return jwt.encode(
            claims(sub, **overrides),
            self.private,
            algorithm=self.alg,
            headers={"kid": kid or self.kid},
        )


def claims(sub: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    out = {"sub": sub, "iat": now, "exp": now + 3600, "aud": AUDIENCE, "iss": ISSUER}
    out.update(overrides)
    return out


def jwks_of(*signers: Signer) -> dict[str, Any]:
    return {"keys": [s.jwk for s in signers]}


def hand_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A JWT built without PyJWT's guards: HMAC-SHA256 with ``hmac_key``, or unsigned."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if hmac_key is None:
        return signing_input + "."
    mac = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def tampered(token: str) -> str:
    """The token with one byte of its signature flipped."""
    head, body, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[len(raw) // 2] ^= 0x01
    return f"{head}.{body}.{b64(bytes(raw))}"


@dataclass(frozen=True)
class Signers:
    rsa1: Signer
    ec1: Signer
    rsa2: Signer
    stranger: Signer


@pytest.fixture(scope="module")
def signers() -> Signers:
    """RSA rsa-1 and EC P-256 ec-1 (published), RSA rsa-2 (rotated in later), and a stranger."""

    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return Signers(
        rsa1=Signer("rsa-1", "RS256", rsa_key()),
        ec1=Signer("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        rsa2=Signer("rsa-2", "RS256", rsa_key()),
        stranger=Signer("rsa-9", "RS256", rsa_key()),
    )


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose document a test may change; counts its requests."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.hits = 0
        self.url = ""

    async def handle(self, _request: web.Request) -> web.Response:
        self.hits += 1
        return web.json_response(self.document)


@contextlib.asynccontextmanager
async def serve_jwks(document: dict[str, Any]) -> AsyncIterator[JwksServer]:
    server = JwksServer(document)
    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", server.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
async def jwks_database(servers: Servers) -> str:
    """A database of its own: these gateways must not take the shared one's outbox lead."""
    return await create_database(servers)


@pytest.fixture(scope="module")
async def jwks_store(jwks_database: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.connect(jwks_database, max_size=2)
    yield s
    await s.close()


@pytest.fixture(scope="module")
async def jwks_server(signers: Signers) -> AsyncIterator[JwksServer]:
    async with serve_jwks(jwks_of(signers.rsa1, signers.ec1)) as server:
        yield server


@pytest.fixture(scope="module")
async def jwks_gateway(
    servers: Servers, jwks_database: str, jwks_server: JwksServer
) -> AsyncIterator[Gateway]:
    """A JWKS-only gateway (no HS256 secret) checking audience and issuer."""
    settings = gateway_settings(
        servers,
        jwks_database,
        jwt_secret=None,
        jwt_jwks=jwks_server.url,
        jwt_audience=AUDIENCE,
        jwt_issuer=ISSUER,
        topic_prefix=PREFIX,
    )
    async with running_gateway(settings) as gw:
        yield gw


@pytest.fixture
async def tenant(jwks_store: PostgresStore) -> Tenant:
    return await make_tenant(jwks_store)


@contextlib.asynccontextmanager
async def device_on(servers: Servers, prefix: str) -> AsyncIterator[Device]:
    async with Device(servers.mqtt_host, servers.ws_port, prefix) as d:
        yield d


@pytest.fixture
async def device(servers: Servers, jwks_gateway: Gateway) -> AsyncIterator[Device]:
    async with device_on(servers, PREFIX) as d:
        yield d


def error_code(reply: dict[str, Any]) -> str | None:
    return str(reply["error"]["code"]) if reply.get("status") == "error" else None


async def open_session(device: Device, tenant: Tenant, token: str, sector: str) -> dict[str, Any]:
    return await device.request(
        "sessions/open",
        tenant.open_payload(sectorId=sector, requestId=secrets.token_hex(4)),
        token=token,
    )


async def poll(
    device: Device, tenant: Tenant, token: Callable[[], str], sector: str, until: str
) -> dict[str, Any]:
    """Send the open again (bounded tries) until its reply is ``until`` (status or error code)."""
    reply: dict[str, Any] = {}
    for _ in range(POLL_ATTEMPTS):
        reply = await open_session(device, tenant, token(), sector)
        if reply["status"] == until or error_code(reply) == until:
            return reply
        await asyncio.sleep(POLL_PAUSE_S)
    return reply


# --- accepted ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kid", ["rsa-1", "ec-1"])
async def test_jwks_tokens_open_sessions(
    device: Device, tenant: Tenant, signers: Signers, kid: str
) -> None:
    """RS256 and ES256 tokens whose kid is in the served JWKS open a session."""
    signer = signers.rsa1 if kid == "rsa-1" else signers.ec1
    reply = await open_session(device, tenant, signer.token(tenant.user), tenant.sector_id)
    assert reply["status"] == "success", reply
    assert reply["data"]["auth0Id"] == tenant.user


# --- refused -----------------------------------------------------------------------------------


def bad_token(case: str, signers: Signers, sub: str) -> str:
    now = int(time.time())
    rsa1 = signers.rsa1
    match case:
        case "alg-none":
            return hand_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(sub), None)
        case "hs256-with-rsa-public-key":
            header = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}
            return hand_token(header, claims(sub), rsa1.public_pem)
        case "tampered-signature":
            return tampered(rsa1.token(sub))
        case "signed-by-another-key":
            return signers.stranger.token(sub, kid="rsa-1")
        case "es256-under-rsa-kid":
            return signers.ec1.token(sub, kid="rsa-1")
        case "expired":
            return rsa1.token(sub, iat=now - 7200, exp=now - 3600)
        case "not-yet-valid":
            return signers.ec1.token(sub, nbf=now + 3600)
        case "wrong-audience":
            return rsa1.token(sub, aud="someone-else")
        case "wrong-issuer":
            return signers.ec1.token(sub, iss="https://evil.example/")
        case "unknown-kid":
            return signers.stranger.token(sub)
        case "no-kid":
            return jwt.encode(claims(sub), rsa1.private, algorithm="RS256")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "alg-none",
        "hs256-with-rsa-public-key",
        "tampered-signature",
        "signed-by-another-key",
        "es256-under-rsa-kid",
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "unknown-kid",
        "no-kid",
    ],
)
async def test_bad_tokens_are_unauthorized(
    device: Device, tenant: Tenant, signers: Signers, case: str
) -> None:
    """Each forged, stale or misdirected token is UNAUTHORIZED and opens nothing."""
    reply = await open_session(
        device, tenant, bad_token(case, signers, tenant.user), tenant.sector_id
    )
    assert error_code(reply) == "UNAUTHORIZED", reply
    # nothing was opened: the same sector still opens with a good token
    good = await open_session(device, tenant, signers.rsa1.token(tenant.user), tenant.sector_id)
    assert good["status"] == "success", good


# --- rotation ----------------------------------------------------------------------------------


async def test_rotated_key_is_accepted_after_refresh(
    servers: Servers,
    jwks_database: str,
    tenant: Tenant,
    signers: Signers,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kid published after startup is fetched on first sight; a dropped kid stops verifying."""
    monkeypatch.setattr(gateway.jwks, "MIN_REFRESH_GAP_S", 0.2)
    prefix = "hb-jwks-rotate/v2"
    async with serve_jwks(jwks_of(signers.rsa1)) as server:
        settings = gateway_settings(
            servers, jwks_database, jwt_secret=None, jwt_jwks=server.url, topic_prefix=prefix
        )
        async with running_gateway(settings), device_on(servers, prefix) as dev:
            assert server.hits == 1
            old = signers.rsa1.token(tenant.user)
            first = await open_session(dev, tenant, old, tenant.sector_id)
            assert first["status"] == "success", first

            server.document = jwks_of(signers.rsa1, signers.rsa2)
            new_sector = tenant.extra_sectors[0]
            refused = await open_session(dev, tenant, signers.rsa2.token(tenant.user), new_sector)
            assert error_code(refused) == "UNAUTHORIZED", refused
            reply = await poll(
                dev, tenant, lambda: signers.rsa2.token(tenant.user), new_sector, "success"
            )
            assert reply["status"] == "success", reply
            assert server.hits >= 2

            # rsa-1 retired: the cached token stops verifying after the next refresh, which a
            # token naming a kid nobody has (here rsa-9) asks for
            server.document = jwks_of(signers.rsa2)
            stranger = signers.stranger.token(tenant.user)
            poked = await open_session(dev, tenant, stranger, tenant.extra_sectors[1])
            assert error_code(poked) == "UNAUTHORIZED", poked
            reply = await poll(dev, tenant, lambda: old, tenant.sector_id, "UNAUTHORIZED")
            assert error_code(reply) == "UNAUTHORIZED", reply


# --- a file, and a JWKS that cannot be loaded ---------------------------------------------------


async def test_jwks_file(
    servers: Servers, jwks_database: str, tenant: Tenant, signers: Signers, tmp_path: Path
) -> None:
    """GATEWAY_JWT_JWKS may be a file path; its keys verify, unknown kids do not."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_of(signers.ec1)))
    prefix = "hb-jwks-file/v2"
    settings = gateway_settings(servers, jwks_database, jwt_jwks=str(path), topic_prefix=prefix)
    async with running_gateway(settings), device_on(servers, prefix) as dev:
        ok = await open_session(dev, tenant, signers.ec1.token(tenant.user), tenant.sector_id)
        assert ok["status"] == "success", ok
        rs = await open_session(dev, tenant, signers.rsa1.token(tenant.user), tenant.sector_id)
        assert error_code(rs) == "UNAUTHORIZED", rs
        # the HS256 secret still works next to the file (tokens without kid)
        hs = await open_session(dev, tenant, tenant.token(), tenant.extra_sectors[0])
        assert hs["status"] == "success", hs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_jwks_refuses_to_start(
    servers: Servers, jwks_database: str, tmp_path: Path
) -> None:
    """A JWKS that cannot be loaded is a ConfigError naming GATEWAY_JWT_JWKS; nothing serves."""
    url = f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"
    settings = gateway_settings(servers, jwks_database, jwt_secret=None, jwt_jwks=url)
    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS") as info:
        await load_keys(settings, verifier_from(settings))
    assert url in str(info.value)

    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS"):
        async with running_gateway(settings):
            pass

    missing = gateway_settings(servers, jwks_database, jwt_jwks=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"nope\.json"):
        await load_keys(missing, verifier_from(missing))


async def test_jwks_answering_an_error_refuses_to_start(
    servers: Servers, jwks_database: str, signers: Signers
) -> None:
    """A JWKS URL answering 404 or a document without usable keys refuses to start."""
    async with serve_jwks({"keys": []}) as server:
        settings = gateway_settings(servers, jwks_database, jwt_jwks=server.url)
        with pytest.raises(ConfigError, match="no usable key"):
            await load_keys(settings, verifier_from(settings))
        settings = gateway_settings(servers, jwks_database, jwt_jwks=server.url + ".missing")
        with pytest.raises(ConfigError, match="HTTP 404"):
            await load_keys(settings, verifier_from(settings))


def test_plain_http_to_another_host_is_refused(servers: Servers) -> None:
    """A JWKS over plain http to a non-loopback host is refused before anything starts."""
    settings = gateway_settings(
        servers, "postgresql://x@127.0.0.1/x", jwt_jwks="http://idp.example/jwks.json"
    )
    with pytest.raises(ConfigError, match="https"):
        verifier_from(settings)
