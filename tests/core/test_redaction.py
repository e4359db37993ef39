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


def test_a_token_whose_dots_are_json_escapes_is_redacted_too() -> None:
    """JSON may write a token's dots as \\u002e (the gateway reads it as the token): only the
    header was redacted, and the claims and signature were kept, usable."""
    header, claims, signature = TOKEN.split(".")
    for dot in (b"\\u002e", b"\\u002E"):
        escaped = dot.join(part.encode() for part in (header, claims, signature))
        out = redact_tokens(b'{"authorization": "Bearer ' + escaped + b'", "units": 1}')
        assert signature.encode() not in out, out
        assert out.endswith(b'<redacted>", "units": 1}'), out


def test_every_token_is_redacted_even_in_broken_json() -> None:
    raw = b"{" + TOKEN.encode() + b" and again " + TOKEN.encode()
    out = redact_tokens(raw)
    assert TOKEN.split(".")[2].encode() not in out
    assert out.count(b"<redacted>") == 2


def test_payloads_without_a_token_are_untouched() -> None:
    raw = b'{"workerId": "eyJ.not-a-token", "units": 1}'
    assert redact_tokens(raw) == raw


def test_a_token_whose_header_has_a_space_is_redacted_too() -> None:
    """A header written '{ "alg": ...}' encodes as 'eyAi...', not 'eyJ...': still a JWT."""
    spaced = jwt.api_jws.encode(
        b'{"sub": "user_1", "exp": 4000000000}', "s" * 32, algorithm="HS256"
    )
    header = jwt.utils.base64url_encode(b'{ "alg": "HS256", "typ": "JWT" }').decode()
    token = ".".join([header, *spaced.split(".")[1:]])
    assert token.startswith("eyA")
    out = redact_tokens(b'{"authorization": "Bearer ' + token.encode() + b'"}')
    assert token.split(".")[2].encode() not in out
    assert b"<redacted>" in out


def test_a_bearer_value_that_is_no_jwt_is_redacted_whole() -> None:
    raw = b'{"authorization": "bearer opaque-session-key-123", "units": 1}'
    assert redact_tokens(raw) == b'{"authorization": "bearer <redacted>", "units": 1}'


def test_our_own_advice_is_not_taken_for_a_token() -> None:
    """The refusal "expected 'Bearer <jwt>'" was kept as "expected 'Bearer <redacted>"."""
    message = b"malformed authorization: expected 'Bearer <jwt>'"
    assert redact_tokens(message) == message
    quoted = b"authorization: 'Bearer abc.def' refused"
    assert redact_tokens(quoted) == b"authorization: 'Bearer <redacted>' refused"


@given(st.binary(max_size=300))
def test_redaction_leaves_token_free_bytes_alone(raw: bytes) -> None:
    out = redact_tokens(raw)
    if b"ey" not in raw and b"bearer" not in raw.lower():
        assert out == raw
    assert isinstance(out, bytes)


def test_the_gateways_own_messages_about_the_scheme_are_kept_as_said() -> None:
    """A refusal's message is stored redacted too; "the Bearer scheme: send ..." lost its
    "scheme:" as if that were a token, so the dead letter no longer said what the client read."""
    for message in (
        b"the Authorization header must use the Bearer scheme: send the header "
        b"Authorization: Bearer <jwt>",
        b"missing token: send the header Authorization: Bearer <jwt>",
    ):
        assert redact_tokens(message) == message
    for opaque in (b"Bearer schemeless-token", b"Bearer scheme-token", b"Bearer scheme.x"):
        assert redact_tokens(opaque) == b"Bearer <redacted>", opaque
