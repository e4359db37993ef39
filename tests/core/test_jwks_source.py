"""The JWKS source's pure parts: which locations are accepted, and how often it may refresh."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.core.auth import KeyRing, TokenVerifier
from gateway.errors import ConfigError, Unauthorized
from gateway.jwks import JwksError, JwksLocation, JwksSource, RefreshPolicy, parse_jwks

T0 = 1_000.0
NOW = 1_760_000_000
FORGERY_SECRET = "f" * 48


@dataclass
class Clock:
    """A monotonic clock the test moves by hand."""

    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeEndpoint:
    """Stands in for the file or URL: serves ``document``, or fails with ``error``."""

    document: dict[str, Any]
    error: Exception | None = None
    calls: int = 0
    raw: bytes | None = field(default=None)

    async def __call__(self) -> bytes:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.raw if self.raw is not None else json.dumps(self.document).encode()


@dataclass(frozen=True)
class Keys:
    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey
    rsa_jwk: dict[str, Any]
    ec_jwk: dict[str, Any]

    def document(self, *jwks: dict[str, Any]) -> dict[str, Any]:
        return {"keys": list(jwks or (self.rsa_jwk, self.ec_jwk))}


@pytest.fixture(scope="module")
def keys() -> Keys:
    """An RSA key (kid rsa-1) and an EC P-256 key (kid ec-1)."""
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True)
    rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
    ec_jwk.update(kid="ec-1")  # no alg: PyJWT infers ES256 from the P-256 curve
    return Keys(rsa_private, ec_private, rsa_jwk, ec_jwk)


def rs256(keys: Keys, sub: str = "user_1") -> str:
    claims = {"sub": sub, "exp": NOW + 3600}
    return "Bearer " + jwt.encode(claims, keys.rsa_private, "RS256", headers={"kid": "rsa-1"})


def forged(kid: str) -> str:
    claims = {"sub": "user_1", "exp": NOW + 3600}
    return "Bearer " + jwt.encode(claims, FORGERY_SECRET, "HS256", headers={"kid": kid})


def source(
    endpoint: FakeEndpoint, clock: Clock, *, interval_s: float = 600, min_gap_s: float = 30
) -> tuple[JwksSource, TokenVerifier]:
    verifier = TokenVerifier(KeyRing(), clock=lambda: float(NOW))
    src = JwksSource(
        JwksLocation.parse("https://idp.example/.well-known/jwks.json"),
        verifier,
        policy=RefreshPolicy(interval_s=interval_s, min_gap_s=min_gap_s),
        clock=clock,
        fetch=endpoint,
    )
    return src, verifier


# --- locations ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "is_url"),
    [
        ("https://idp.example/.well-known/jwks.json", True),
        ("HTTPS://idp.example/jwks", True),
        ("https://idp.example:8443/jwks", True),
        ("http://127.0.0.1:8080/jwks.json", True),
        ("http://127.0.0.2/jwks.json", True),
        ("http://localhost/jwks.json", True),
        ("http://LOCALHOST:9/jwks.json", True),
        ("http://[::1]:8080/jwks.json", True),
        ("/etc/hydrobit/jwks.json", False),
        ("jwks.json", False),
        ("  /etc/hydrobit/jwks.json  ", False),
    ],
)
def test_accepted_locations(value: str, is_url: bool) -> None:
    """https anywhere, http only on loopback, and plain file paths are accepted."""
    assert JwksLocation.parse(value).is_url is is_url


@pytest.mark.parametrize(
    "value",
    [
        "http://idp.example/jwks.json",
        "http://10.0.0.7/jwks.json",
        "http://[2001:db8::1]/jwks.json",
        "http://localhost.evil.example/jwks.json",
        "http://127.0.0.1.evil.example/jwks.json",
        "ftp://idp.example/jwks.json",
        "file:///etc/hydrobit/jwks.json",
        "https:///jwks.json",
        "",
        "   ",
    ],
)
def test_refused_locations(value: str) -> None:
    """Plain http to another host, other schemes and empty values are a ConfigError."""
    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS"):
        JwksLocation.parse(value)


def test_display_hides_credentials() -> None:
    """Logs and errors show the URL without user info or query string."""
    location = JwksLocation.parse("https://me:hunter2@idp.example:8443/jwks?key=s3cret")
    assert location.display == "https://idp.example:8443/jwks"


# --- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"<html>", "not JSON"),
        (b"[]", "keys"),
        (b'{"keys": {}}', "keys"),
        (b'{"keys": []}', "no usable key"),
        (b'{"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}', "RS256/ES256"),
        (b'{"keys": [{"kty": "RSA", "kid": "broken", "n": "AQAB"}]}', "no usable key"),
    ],
)
def test_unusable_documents(raw: bytes, reason: str) -> None:
    """A document without any RS256/ES256 key with a kid is refused, saying why."""
    with pytest.raises(JwksError, match=reason):
        parse_jwks(raw)


def test_keys_without_kid_are_unusable(keys: Keys) -> None:
    """Keys without a kid cannot be picked by a token, so they do not count."""
    bare = {k: v for k, v in keys.rsa_jwk.items() if k != "kid"}
    with pytest.raises(JwksError, match="kid"):
        parse_jwks(json.dumps({"keys": [bare]}).encode())


def test_only_public_signing_keys_with_string_kids_count(keys: Keys) -> None:
    """Keys for encryption, published private keys and non-string kids are left out."""
    private = RSAAlgorithm.to_jwk(keys.rsa_private, as_dict=True)
    unusable = [
        {**keys.rsa_jwk, "use": "enc"},
        {**private, "kid": "leaked", "alg": "RS256"},
        {**keys.ec_jwk, "kid": ["ec-1"]},
        {**keys.ec_jwk, "kid": 7},
    ]
    for jwk in unusable:
        with pytest.raises(JwksError):
            parse_jwks(json.dumps({"keys": [jwk]}).encode())
    ring = KeyRing(jwks=parse_jwks(json.dumps({"keys": [*unusable, keys.ec_jwk]}).encode()))
    assert ring.by_kid("ec-1") is not None
    assert ring.by_kid("leaked") is None
    assert ring.by_kid("rsa-1") is None


# --- the refresh policy ------------------------------------------------------------------------


def test_policy_schedule() -> None:
    """First fetch at once; then every interval, or min_gap after an unknown kid."""
    policy = RefreshPolicy(interval_s=600, min_gap_s=30)
    assert policy.due_at() < T0
    policy.attempted(T0, ok=True)
    assert policy.due_at() == T0 + 600
    policy.want()
    assert policy.due_at() == T0 + 30
    policy.attempted(T0 + 30, ok=True)
    assert policy.due_at() == T0 + 630


def test_policy_backoff_is_bounded() -> None:
    """Failures back off from min_gap, doubling up to the interval; a success resets it."""
    policy = RefreshPolicy(interval_s=600, min_gap_s=30)
    now, gaps = T0, []
    for _ in range(40):
        policy.attempted(now, ok=False)
        policy.want()  # unknown kids do not shorten a backoff
        gaps.append(policy.due_at() - now)
        now = policy.due_at()
    assert gaps[:7] == [30, 60, 120, 240, 480, 600, 600]
    assert max(gaps) == 600
    policy.attempted(now, ok=True)
    assert policy.due_at() == now + 600


def test_policy_never_closer_than_min_gap() -> None:
    """An interval below the gap cannot make refreshes more frequent than the gap."""
    policy = RefreshPolicy(interval_s=5, min_gap_s=30)
    policy.attempted(T0, ok=True)
    assert policy.due_at() == T0 + 30


@pytest.mark.parametrize(("interval_s", "min_gap_s"), [(0, 30), (600, 0), (600, -1)])
def test_policy_refuses_zero_gaps(interval_s: float, min_gap_s: float) -> None:
    """A zero gap would let the refresher spin; it is refused."""
    with pytest.raises(ValueError, match="positive"):
        RefreshPolicy(interval_s=interval_s, min_gap_s=min_gap_s)


# --- the source, with an injected clock and endpoint -------------------------------------------


async def test_load_installs_the_keys(keys: Keys) -> None:
    """After load, RS256 tokens with a JWKS kid verify."""
    src, verifier = source(FakeEndpoint(keys.document()), Clock())
    await src.load()
    assert verifier.verify(rs256(keys)).sub == "user_1"


@pytest.mark.parametrize(
    "endpoint",
    [
        FakeEndpoint({}, error=OSError("connection refused")),
        FakeEndpoint({}, error=TimeoutError()),
        FakeEndpoint({"keys": []}),
        FakeEndpoint({}, raw=b"<html>not found</html>"),
    ],
    ids=["unreachable", "timeout", "empty", "not-json"],
)
async def test_failed_load_is_a_config_error(endpoint: FakeEndpoint) -> None:
    """A JWKS that cannot be loaded at startup is a ConfigError naming the variable and URL."""
    src, _ = source(endpoint, Clock())
    with pytest.raises(ConfigError, match="GATEWAY_JWT_JWKS") as info:
        await src.load()
    assert "https://idp.example/.well-known/jwks.json" in str(info.value)


async def test_unknown_kid_flood_is_rate_limited(keys: Keys) -> None:
    """However many forged kids arrive, the endpoint is asked at most once per min_gap."""
    endpoint, clock = FakeEndpoint(keys.document()), Clock()
    src, verifier = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    assert endpoint.calls == 1
    assert not await src.refresh_if_due()  # nothing asked for a refresh yet
    for second in range(90):
        clock.now = T0 + second
        for i in range(50):
            with pytest.raises(Unauthorized, match="unknown key"):
                verifier.verify(forged(f"forged-{second}-{i}"))
        await src.refresh_if_due()
    assert endpoint.calls == 1 + 2  # at T0 + 30 and T0 + 60
    assert len(verifier.unknown_kids) <= 64


async def test_unknown_kid_refresh_brings_in_a_rotated_key(keys: Keys) -> None:
    """A kid published after the last fetch verifies once the early refresh has run."""
    endpoint, clock = FakeEndpoint(keys.document(keys.ec_jwk)), Clock()
    src, verifier = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    with pytest.raises(Unauthorized, match="unknown key"):
        verifier.verify(rs256(keys))
    endpoint.document = keys.document()
    clock.now = T0 + 30
    assert await src.refresh_if_due()
    assert verifier.verify(rs256(keys)).sub == "user_1"
    assert verifier.unknown_kids == set()


async def test_without_unknown_kids_only_the_schedule_refreshes(keys: Keys) -> None:
    """With no unknown kid, the endpoint is asked once per interval."""
    endpoint, clock = FakeEndpoint(keys.document()), Clock()
    src, _ = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    for second in range(0, 1801, 10):
        clock.now = T0 + second
        await src.refresh_if_due()
    assert endpoint.calls == 1 + 3


async def test_failed_refresh_keeps_the_keys(keys: Keys, caplog: pytest.LogCaptureFixture) -> None:
    """A refresh that fails logs a warning and leaves the previous keys in place."""
    endpoint, clock = FakeEndpoint(keys.document()), Clock()
    src, verifier = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    endpoint.error = OSError("connection reset")
    clock.now = T0 + 600
    with caplog.at_level(logging.WARNING, logger="gateway.jwks"):
        assert await src.refresh_if_due()
    assert "keeping the 2 keys" in caplog.text
    assert verifier.verify(rs256(keys, sub="still")).sub == "still"
    endpoint.error = None
    endpoint.raw = b'{"keys": []}'  # a broken document is a failure too
    clock.now = T0 + 630
    assert await src.refresh_if_due()
    assert verifier.verify(rs256(keys, sub="again")).sub == "again"


async def test_unexpected_failure_keeps_the_keys_and_the_gap(keys: Keys) -> None:
    """Even an unexpected error in a refresh is contained, and still counts as an attempt."""
    endpoint, clock = FakeEndpoint(keys.document()), Clock()
    src, verifier = source(endpoint, clock)
    await src.load()
    endpoint.error = RuntimeError("bug")
    clock.now = T0 + 600
    assert await src.refresh_if_due()
    assert not await src.refresh_if_due()
    assert src.policy.failures == 1
    assert verifier.verify(rs256(keys)).sub == "user_1"


async def test_removed_key_stops_verifying_cached_tokens(keys: Keys) -> None:
    """A key dropped from the JWKS stops verifying at once, even tokens already cached."""
    endpoint, clock = FakeEndpoint(keys.document()), Clock()
    src, verifier = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    token = rs256(keys)
    assert verifier.verify(token).sub == "user_1"
    endpoint.document = keys.document(keys.ec_jwk)
    clock.now = T0 + 600
    assert await src.refresh_if_due()
    with pytest.raises(Unauthorized):
        verifier.verify(token)


async def test_added_key_keeps_the_cache(keys: Keys) -> None:
    """A refresh that only adds keys keeps verified tokens cached."""
    endpoint, clock = FakeEndpoint(keys.document(keys.rsa_jwk)), Clock()
    src, verifier = source(endpoint, clock, interval_s=600, min_gap_s=30)
    await src.load()
    token = rs256(keys)
    first = verifier.verify(token)
    endpoint.document = keys.document()
    clock.now = T0 + 600
    assert await src.refresh_if_due()
    assert verifier.verify(token) is first
