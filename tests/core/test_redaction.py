"""Dead letters keep what a device sent, but never a usable token."""

from __future__ import annotations

import jwt
from hypothesis import given
from hypothesis import strategies as st

from gateway.deadletters import redact_tokens

TOKEN = jwt.encode({"sub": "user_1", "exp": 4_000_000_000}, "s" * 32, algorithm="HS256")


def test_a_token_in_the_payload_loses_its_signature_and_keeps_its_claims() -> None:
    raw = b'{"authorization": "Bearer ' + TOKEN.encode() + b'", "units": "x"}'
    out = redact_tokens(raw)
    header, claims, signature = TOKEN.split(".")
    assert signature.encode() not in out
    assert f"{header}.{claims}.<redacted>".encode() in out
    assert out.endswith(b'", "units": "x"}')


def test_every_token_is_redacted_even_in_broken_json() -> None:
    raw = b"{" + TOKEN.encode() + b" and again " + TOKEN.encode()
    out = redact_tokens(raw)
    assert TOKEN.split(".")[2].encode() not in out
    assert out.count(b"<redacted>") == 2


def test_payloads_without_a_token_are_untouched() -> None:
    raw = b'{"workerId": "eyJ.not-a-token", "units": 1}'
    assert redact_tokens(raw) == raw


@given(st.binary(max_size=300))
def test_redaction_leaves_token_free_bytes_alone(raw: bytes) -> None:
    out = redact_tokens(raw)
    if b"eyJ" not in raw:
        assert out == raw
    assert isinstance(out, bytes)
