"""Where the JWKS of ``GATEWAY_JWT_JWKS`` comes from, and how it stays fresh (SPEC §3).

The verifier in ``gateway.core.auth`` is pure: it checks tokens against the keys it is given. This
module does the I/O that feeds it: it reads a file (in a thread) or fetches an https URL (aiohttp,
bounded by a timeout) so the event loop never blocks, installs the keys in the ``KeyRing``, and
refreshes them in the background. An identity provider rotates keys by publishing a new kid, so
an unknown kid asks for an early refresh, but kids are chosen by whoever sends a token: refreshes
are rate-limited (``RefreshPolicy``) and a failed one keeps the keys in hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from jwt import PyJWTError

from gateway.config import Settings
from gateway.core.auth import KeyRing, TokenVerifier
from gateway.errors import ConfigError

log = logging.getLogger(__name__)

# Read when ``load_keys`` builds the source, so a test can shorten them with monkeypatch.
REFRESH_INTERVAL_S = 600.0  # the scheduled refresh: catches rotations nobody has used yet
MIN_REFRESH_GAP_S = 30.0  # never fetch more often, however many unknown kids arrive
FETCH_TIMEOUT_S = 5.0
MAX_JWKS_BYTES = 1 << 20  # a JWKS is a few kB; refuse to buffer an endless answer

LOOPBACK_NAMES = frozenset({"localhost"})


class JwksError(Exception):
    """The JWKS could not be read or holds no usable key (the message says why)."""


@dataclass(frozen=True, slots=True)
class JwksLocation:
    """A checked ``GATEWAY_JWT_JWKS``: a local file, or an https URL (http only on loopback)."""

    value: str
    is_url: bool

    @classmethod
    def parse(cls, value: str) -> JwksLocation:
        """Refuse plain http to another host: the JWKS decides who may sign tokens, so an
        attacker on the path must not be able to swap it. Loopback http is allowed for tests
        and a local sidecar."""
        value = value.strip()
        if not value:
            raise ConfigError("GATEWAY_JWT_JWKS is empty: give a file path or an https:// URL")
        if "://" not in value:
            return cls(value, is_url=False)
        parts = urlsplit(value)
        scheme = parts.scheme.lower()
        if scheme == "https" and parts.hostname:
            return cls(value, is_url=True)
        if scheme == "http" and parts.hostname and is_loopback(parts.hostname):
            return cls(value, is_url=True)
        raise ConfigError(
            f"GATEWAY_JWT_JWKS {_redact(value)!r} is not accepted: give a file path or an "
            "https:// URL (plain http:// only for 127.0.0.1, localhost or ::1)"
        )

    @property
    def display(self) -> str:
        """For logs and errors: no user info or query string (they may hold credentials)."""
        return _redact(self.value) if self.is_url else self.value


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    host = host.lower().strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return url.split("?", 1)[0]
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_jwks(raw: bytes) -> dict[str, Any]:
    """The JWKS document in ``raw``, if it holds at least one key the verifier can use."""
    try:
        document = json.loads(raw)
    except ValueError:
        raise JwksError("the answer is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError('expected a JSON object {"keys": [...]}')
    try:
        usable = KeyRing(jwks=document).has_jwks
    except (PyJWTError, TypeError, ValueError) as exc:
        raise JwksError(f"no usable key ({exc})") from None
    if not usable:
        raise JwksError('no RS256/ES256 key with a "kid" in it')
    return document


@dataclass(slots=True)
class RefreshPolicy:
    """When the next fetch may happen. Pure: the caller passes the time.

    Every ``interval_s`` on schedule; ``min_gap_s`` after the last attempt when an unknown kid
    wants fresh keys; after failures, a backoff from ``min_gap_s`` doubling up to ``interval_s``.
    Never two attempts closer than ``min_gap_s``: a flood of forged kids costs the JWKS host at
    most one request per gap.
    """

    interval_s: float = REFRESH_INTERVAL_S
    min_gap_s: float = MIN_REFRESH_GAP_S
    last_attempt: float | None = None
    failures: int = 0
    wanted: bool = False

    def __post_init__(self) -> None:
        if not (self.min_gap_s > 0 and self.interval_s > 0):
            raise ValueError("the refresh interval and gap must be positive")

    def want(self) -> None:
        """An unknown kid was seen: refresh as soon as the gap allows."""
        self.wanted = True

    def due_at(self) -> float:
        """The earliest time (on the caller's clock) of the next attempt."""
        if self.last_attempt is None:
            return -math.inf
        if self.failures:
            gap = min(self.min_gap_s * 2.0 ** min(self.failures - 1, 20), self.interval_s)
        elif self.wanted:
            gap = self.min_gap_s
        else:
            gap = self.interval_s
        return self.last_attempt + max(gap, self.min_gap_s)

    def attempted(self, now: float, *, ok: bool) -> None:
        self.last_attempt = now
        self.wanted = False
        self.failures = 0 if ok else self.failures + 1


class JwksSource:
    """Loads the JWKS into the verifier's key ring and keeps it fresh (``run()``); it becomes
    the verifier's ``on_unknown_kid`` hook, so a new kid asks for an early refresh."""

    def __init__(
        self,
        location: JwksLocation,
        verifier: TokenVerifier,
        *,
        policy: RefreshPolicy | None = None,
        timeout_s: float = FETCH_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        fetch: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        self.location = location
        self.verifier = verifier
        self.policy = policy or RefreshPolicy()
        self.timeout_s = timeout_s
        self._clock = clock
        self._fetch = fetch or (self._get_url if location.is_url else self._read_file)
        self._wake = asyncio.Event()
        self._kids: dict[str, Any] = {}
        verifier.on_unknown_kid = self.notify_unknown_kid

    def notify_unknown_kid(self, _kid: str) -> None:
        """The verifier's hook: ask for an early refresh (rate-limited by the policy)."""
        self.policy.want()
        self._wake.set()

    async def load(self) -> None:
        """The startup load: without its keys the gateway must not serve, so failing is fatal."""
        try:
            await self._refresh()
        except JwksError as exc:
            raise ConfigError(
                f"GATEWAY_JWT_JWKS: cannot load the JWKS from {self.location.display}: {exc}. "
                "Point it at a readable file or a reachable https URL serving "
                '{"keys": [...]} with RS256/ES256 keys that have a "kid"'
            ) from None

    async def refresh_if_due(self) -> bool:
        """Refresh if the policy allows it now; a failure keeps the old keys and is logged."""
        if self.policy.due_at() > self._clock():
            return False
        try:
            await self._refresh()
        except JwksError as exc:
            log.warning(
                "JWKS refresh from %s failed, keeping the %d keys in hand: %s",
                self.location.display,
                len(self._kids),
                exc,
            )
        except Exception:  # a bug here must not stop the gateway; the old keys stay
            log.exception("JWKS refresh from %s failed unexpectedly", self.location.display)
        return True

    async def run(self) -> None:
        """Refresh forever: on schedule, and soon after an unknown kid; never raises."""
        while True:
            await self.refresh_if_due()
            delay = self.policy.due_at() - self._clock()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)

    async def _refresh(self) -> None:
        ok = False
        try:
            document = parse_jwks(await self._fetch_bounded())
            self._install(document)
            ok = True
        finally:  # whatever happened, the attempt counts: no retry loop without a gap
            self.policy.attempted(self._clock(), ok=ok)

    def _install(self, document: dict[str, Any]) -> None:
        kids = {
            k["kid"]: k
            for k in document["keys"]
            if isinstance(k, dict) and isinstance(k.get("kid"), str)
        }
        self.verifier.keys.replace_jwks(document)
        # A key gone or changed must stop verifying now, not when its cached tokens expire.
        if any(kids.get(kid) != key for kid, key in self._kids.items()):
            self.verifier.forget_verified()
        if kids.keys() != self._kids.keys():
            usable = sorted(kid for kid in kids if self.verifier.keys.by_kid(kid) is not None)
            log.info("JWKS from %s: kids %s", self.location.display, usable)
            if ignored := sorted(kids.keys() - set(usable)):
                log.warning(
                    "JWKS from %s: keys %s ignored (a type, curve or alg this gateway does not "
                    "accept, or a key that does not match its alg): tokens naming them are refused",
                    self.location.display,
                    ignored,
                )
        self._kids = kids
        self.verifier.unknown_kids.clear()

    async def _fetch_bounded(self) -> bytes:
        try:
            return await self._fetch()
        except JwksError:
            raise
        except TimeoutError:
            raise JwksError(f"no answer within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise JwksError(str(exc) or type(exc).__name__) from None

    async def _read_file(self) -> bytes:
        def read() -> bytes:
            with Path(self.location.value).open("rb") as f:
                return f.read(MAX_JWKS_BYTES + 1)

        raw = await asyncio.to_thread(read)
        if len(raw) > MAX_JWKS_BYTES:
            raise JwksError(f"the file is larger than {MAX_JWKS_BYTES} bytes")
        return raw

    async def _get_url(self) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout) as http,
            http.get(self.location.value, max_redirects=3) as resp,
        ):
            # A redirect must not downgrade to plain http on another host.
            if resp.url.scheme != "https" and not is_loopback(resp.url.host or ""):
                raise JwksError(f"redirected to {_redact(str(resp.url))}, which is not https")
            if resp.status != 200:
                raise JwksError(f"HTTP {resp.status} {resp.reason or ''}".rstrip())
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65_536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise JwksError(f"the answer is larger than {MAX_JWKS_BYTES} bytes")
            return bytes(body)


async def load_keys(settings: Settings, verifier: TokenVerifier) -> JwksSource | None:
    """Load ``GATEWAY_JWT_JWKS`` into ``verifier`` before serving; the source to ``run()``,
    or None without a JWKS. Raises ``ConfigError`` if the JWKS cannot be loaded at all."""
    if not settings.jwt_jwks:
        return None
    source = JwksSource(
        JwksLocation.parse(settings.jwt_jwks),
        verifier,
        policy=RefreshPolicy(interval_s=REFRESH_INTERVAL_S, min_gap_s=MIN_REFRESH_GAP_S),
        timeout_s=FETCH_TIMEOUT_S,
    )
    await source.load()
    return source
