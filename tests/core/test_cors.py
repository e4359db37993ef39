"""CORS for browsers calling the HTTP sidecar: which origins may read which responses."""

from __future__ import annotations

import pytest

from gateway.transport.http import cors_headers, parse_origins


def test_star_allows_any_origin_without_credentials() -> None:
    """`*`: any page may call with its own token; no cookies are ever involved."""
    allowed = parse_origins("*")
    assert allowed is None
    headers = cors_headers("https://dashboard.farm.example", allowed)
    assert headers["Access-Control-Allow-Origin"] == "*"
    exposed = headers["Access-Control-Expose-Headers"].split(", ")
    assert exposed == ["X-Idempotent-Replay", "Retry-After", "WWW-Authenticate", "Allow"]
    assert "Access-Control-Allow-Credentials" not in headers


def test_a_list_echoes_only_listed_origins() -> None:
    """A list: a listed origin is echoed back (with Vary: Origin), any other gets nothing."""
    allowed = parse_origins(" https://a.example/ , http://localhost:3000")
    assert allowed == frozenset({"https://a.example", "http://localhost:3000"})
    ok = cors_headers("http://localhost:3000", allowed)
    assert ok["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert ok["Vary"] == "Origin"
    refused = cors_headers("https://evil.example", allowed)
    assert "Access-Control-Allow-Origin" not in refused
    assert refused == {"Vary": "Origin"}


@pytest.mark.parametrize("value", ["", " , "])
def test_empty_allows_no_browser(value: str) -> None:
    assert parse_origins(value) == frozenset()
    assert "Access-Control-Allow-Origin" not in cors_headers("https://a.example", frozenset())


def test_no_origin_no_headers() -> None:
    """Devices, curl and servers send no Origin: no CORS headers; with a list of origins the
    answer says it varies by Origin, so a shared cache does not serve it to a listed page."""
    assert cors_headers(None, None) == {}
    assert cors_headers(None, frozenset()) == {}
    assert cors_headers("", frozenset({"https://a.example"})) == {"Vary": "Origin"}
