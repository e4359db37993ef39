"""JWT verification (SPEC §3): a token in, a ``Claims`` out, or ``Unauthorized``.

Pure: keys are given (the HS256 secret, a parsed JWKS); the clock is injected. The algorithm is
pinned by the key that verifies it, so ``alg: none`` and algorithm confusion cannot pass.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt import PyJWK, PyJWKSet

from gateway.errors import Unauthorized

ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "ES256", "ES384", "PS256"})


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token says about its bearer."""

    sub: str
    exp: float


class KeyRing:
    """The keys tokens may be signed with: an HS256 secret and/or a JWKS (RS256/ES256)."""

    def __init__(self, *, secret: str | None = None, jwks: Mapping[str, Any] | None = None):
        self.secret = secret
        self._by_kid: dict[str, PyJWK] = {}
        if jwks is not None:
            self.replace_jwks(jwks)

    def replace_jwks(self, jwks: Mapping[str, Any]) -> None:
        keys: dict[str, PyJWK] = {}
        for key in PyJWKSet.from_dict(dict(jwks)).keys:
            if _verifies(key):
                keys[str(key.key_id)] = key
        self._by_kid = keys

    @property
    def has_jwks(self) -> bool:
        return bool(self._by_kid)

    def by_kid(self, kid: str) -> PyJWK | None:
        return self._by_kid.get(kid)


def _verifies(key: PyJWK) -> bool:
    """A JWKS key a token may name: a string kid, asymmetric, for signatures, public only (a
    published private key is a leak, and would fail every verification with an odd error)."""
    return (
        isinstance(key.key_id, str)
        and bool(key.key_id)
        and key.algorithm_name in ASYMMETRIC_ALGORITHMS
        and key.public_key_use in (None, "sig")
        and not isinstance(key.key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    )


# what a request carries when it sent two different authorization values (two MQTT user
# properties, two HTTP headers): refused, rather than one picked, which could act as another user
AMBIGUOUS_AUTHORIZATION = "\x00two different authorization values"
# A JWT is a few hundred bytes (a JWKS-signed one with many claims, a few KB): longer is abuse.
MAX_AUTHORIZATION = 16_384
CACHEABLE_AUTHORIZATION = 4_096  # 10,000 cached tokens: ~40 MB at worst


def one_authorization(carried: str | None, in_payload: str | None) -> str | None:
    """The authorization of a request that may carry it as an MQTT 5 user property and in its
    payload (SPEC §3, for MQTT 3.1.1): the two must agree when both are sent."""
    if not carried:
        return in_payload
    if in_payload and in_payload != carried:
        return AMBIGUOUS_AUTHORIZATION
    return carried


def bearer_token(value: str | None) -> str:
    """The JWT inside an ``authorization`` value (``Bearer <jwt>``)."""
    if value == AMBIGUOUS_AUTHORIZATION:
        raise Unauthorized("two different authorization values were sent: send exactly one")
    if not value:
        raise Unauthorized(
            "missing token: send the user property authorization = 'Bearer <jwt>' "
            '(MQTT 3.1.1: the payload field "authorization")'
        )
    scheme, _, token = value.strip().partition(" ")
    if token and scheme.lower() == "bearer":
        return token.strip()
    if not token and value.count(".") == 2:  # as HTTP's Authorization header: the scheme first
        raise Unauthorized("malformed authorization: put 'Bearer ' before the token")
    raise Unauthorized("malformed authorization: expected 'Bearer <jwt>'")


class TokenVerifier:
    """Verifies tokens against a key ring; remembers verified tokens (bounded, exp re-checked)."""

    def __init__(
        self,
        keys: KeyRing,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway_s: float = 30,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.audience = audience
        self.issuer = issuer
        self.leeway_s = leeway_s
        self._clock = clock
        self._cache: dict[str, Claims] = {}
        self._cache_size = cache_size
        self.unknown_kids: set[str] = set()
        # Told about each unknown kid (e.g. to refresh a JWKS soon); must be quick and not raise.
        self.on_unknown_kid: Callable[[str], None] | None = None

    def forget_verified(self) -> None:
        """Drop the remembered tokens, so a key taken out of the JWKS stops verifying at once."""
        self._cache.clear()

    def verify(self, authorization: str | None) -> Claims:
        """The claims of a verified token; the cache is keyed by the whole header value, and
        holds only values of a token's usual size (a flood of padded copies of one good token
        must not fill memory)."""
        if authorization is not None and len(authorization) > MAX_AUTHORIZATION:
            raise Unauthorized(
                f"authorization is {len(authorization)} characters; a token is at most "
                f"{MAX_AUTHORIZATION}: send 'Bearer <jwt>' alone"
            )
        now = self._clock()
        cached = self._cache.get(authorization) if authorization else None
        if cached is not None:
            if cached.exp + self.leeway_s < now:
                del self._cache[authorization]  # type: ignore[arg-type]
                raise Unauthorized("token expired: get a new one")
            return cached
        claims = self._verify_uncached(bearer_token(authorization), now)
        if len(authorization) > CACHEABLE_AUTHORIZATION:  # type: ignore[arg-type]
            return claims
        if len(self._cache) >= self._cache_size:
            # FIFO eviction: drop the oldest eighth so the cost is amortised.
            for old in list(self._cache)[: max(1, self._cache_size // 8)]:
                del self._cache[old]
        self._cache[authorization] = claims  # type: ignore[index]
        return claims

    def _key_for(self, header: Mapping[str, Any]) -> tuple[Any, str]:
        alg = header.get("alg")
        kid = header.get("kid")
        if kid is not None:
            if not isinstance(kid, str):
                raise Unauthorized("token header kid must be a string")
            jwk = self.keys.by_kid(kid)
            if jwk is None:
                if len(self.unknown_kids) < 64:  # bounded: kids are attacker-controlled
                    self.unknown_kids.add(kid)
                if self.on_unknown_kid is not None:
                    self.on_unknown_kid(kid)
                shown = kid if len(kid) <= 64 else f"{kid[:64]}..."
                raise Unauthorized(f"token signed with unknown key id {shown!r}")
            return jwk, jwk.algorithm_name
        if self.keys.has_jwks and not self.keys.secret:
            raise Unauthorized("token header must name its key (kid) from the JWKS")
        if self.keys.secret is None:
            raise Unauthorized("no key can verify this token")
        if alg != "HS256":
            raise Unauthorized(f"token algorithm {alg!r} not accepted without a kid; use HS256")
        return self.keys.secret, "HS256"

    def _verify_uncached(self, token: str, now: float) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
            key, alg = self._key_for(header)
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": ["exp", "sub"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": self.audience is not None,
                    "verify_iss": self.issuer is not None,
                },
            )
        except Unauthorized:
            raise
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience is not accepted here") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer is not accepted here") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise Unauthorized("token algorithm is not accepted for its key") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"token is invalid: {exc}") from None
        except (ValueError, TypeError):
            raise Unauthorized("token is malformed") from None
        return self._check_claims(payload, now)

    def _check_claims(self, payload: Mapping[str, Any], now: float) -> Claims:
        sub, exp, nbf = payload.get("sub"), payload.get("exp"), payload.get("nbf")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token sub must be a non-empty string")
        if "\x00" in sub or not _storable(sub):
            raise Unauthorized("token sub holds a character no user id can (NUL, or invalid UTF-8)")
        if not _is_number(exp):
            raise Unauthorized("token exp must be a number (seconds since the epoch)")
        assert isinstance(exp, int | float)
        if float(exp) + self.leeway_s < now:
            raise Unauthorized("token expired: get a new one")
        if nbf is not None:
            if not _is_number(nbf):
                raise Unauthorized("token nbf must be a number")
            assert isinstance(nbf, int | float)
            if float(nbf) - self.leeway_s > now:
                raise Unauthorized("token is not valid yet (nbf in the future)")
        return Claims(sub=sub, exp=float(exp))


def _storable(text: str) -> bool:
    """Can ``text`` be written as UTF-8 (no lone surrogate)?"""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _is_number(value: object) -> bool:
    """A finite number (a NaN or infinite exp would never expire)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def mint_token(
    secret: str,
    sub: str,
    *,
    ttl_s: float,
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """An HS256 development token (``gateway token``)."""
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {"sub": sub, "iat": issued, "exp": issued + int(ttl_s)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm="HS256")
