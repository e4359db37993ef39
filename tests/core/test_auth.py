"""JWT verification of SPEC §3: HS256 and JWKS keys, pinned algorithms, claims, the cache."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from gateway.core.auth import (
    AMBIGUOUS_AUTHORIZATION,
    Claims,
    KeyRing,
    TokenVerifier,
    bearer_token,
    mint_token,
    one_authorization,
)
from gateway.errors import Unauthorized

SECRET = "s" * 32 + "0123456789abcdef0123456789abcdef"
OTHER_SECRET = "o" * 64
NOW = 1_760_000_000.0
SUB = "user_123456789"


@dataclass
class Clock:
    """An injectable clock the test moves by hand."""

    now: float = NOW

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A JWT built without PyJWT's guards: HMAC-SHA256 with ``key``, or unsigned if None."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"sub": SUB, "iat": int(NOW), "exp": int(NOW) + 3600}
    for key, value in extra.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def hs256(payload: dict[str, Any], secret: str = SECRET, **headers: Any) -> str:
    return jwt.encode(payload, secret, algorithm="HS256", headers=headers or None)


def bearer(token: str) -> str:
    return f"Bearer {token}"


def verifier(
    keys: KeyRing | None = None, *, clock: Clock | None = None, **kwargs: Any
) -> TokenVerifier:
    return TokenVerifier(keys or KeyRing(secret=SECRET), clock=clock or Clock(), **kwargs)


# --- the bearer header -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer a.b.c", "a.b.c"),
        ("bearer a.b.c", "a.b.c"),
        ("BEARER a.b.c", "a.b.c"),
        ("  Bearer   a.b.c  ", "a.b.c"),
    ],
)
def test_bearer_token(value: str, token: str) -> None:
    """The JWT is taken out of 'Bearer <jwt>' (scheme case-insensitive)."""
    assert bearer_token(value) == token


@pytest.mark.parametrize(
    "value", [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token a.b.c", "abc", "a.b"]
)
def test_bearer_token_refusals(value: str | None) -> None:
    """Missing or malformed authorization is UNAUTHORIZED."""
    with pytest.raises(Unauthorized) as info:
        bearer_token(value)
    assert info.value.code == "UNAUTHORIZED"


def test_a_token_without_its_scheme_is_refused_saying_so() -> None:
    """SPEC §3: the value is 'Bearer <jwt>'; a bare JWT is refused (as over HTTP), saying how."""
    with pytest.raises(Unauthorized, match="put 'Bearer ' before the token"):
        bearer_token("a.b.c")


# --- HS256 -----------------------------------------------------------------------------------


def test_valid_hs256_token() -> None:
    """A valid HS256 token gives its sub and exp."""
    result = verifier().verify(bearer(hs256(claims())))
    assert result == Claims(sub=SUB, exp=NOW + 3600)


def test_mint_token_round_trip() -> None:
    """A token from `gateway token` verifies, with audience and issuer when configured."""
    token = mint_token(SECRET, SUB, ttl_s=60, audience="aud", issuer="iss", now=NOW)
    result = verifier(audience="aud", issuer="iss").verify(bearer(token))
    assert result == Claims(sub=SUB, exp=NOW + 60)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(claims(exp=int(NOW) - 31), id="expired"),
        pytest.param(claims(exp=int(NOW) - 86_400), id="long-expired"),
        pytest.param(claims(nbf=int(NOW) + 31), id="nbf-in-future"),
        pytest.param(claims(exp=...), id="missing-exp"),
        pytest.param(claims(sub=...), id="missing-sub"),
        pytest.param(claims(sub=""), id="empty-sub"),
        pytest.param(claims(exp="9999999999"), id="exp-string"),
        pytest.param(claims(nbf="0"), id="nbf-string"),
        pytest.param(claims(exp=True), id="exp-bool"),
    ],
)
def test_hs256_claim_refusals(payload: dict[str, Any]) -> None:
    """Expired, not-yet-valid, or without a usable exp or sub: UNAUTHORIZED."""
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(hs256(payload)))


@pytest.mark.parametrize("sub", ["user\u0000x", "\ud800", "user\udfff"])
def test_a_sub_no_database_can_store_is_refused(sub: str) -> None:
    """A signed token whose sub holds a NUL (PostgreSQL text cannot) or a lone surrogate (no
    UTF-8 can) failed the whole batch it landed in when the user was looked up: every
    request of it, other companies' too, answered INTERNAL. UNAUTHORIZED, alone, now."""
    token = hand_token({"alg": "HS256", "typ": "JWT"}, claims(sub=sub), SECRET.encode())
    with pytest.raises(Unauthorized, match="sub"):
        verifier().verify(bearer(token))


def test_sub_must_be_a_string() -> None:
    """A numeric sub is refused (the token is built by hand; PyJWT refuses to mint it)."""
    token = hand_token({"alg": "HS256", "typ": "JWT"}, claims(sub=123), SECRET.encode())
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(token))


@pytest.mark.parametrize(
    ("payload", "leeway_s", "ok"),
    [
        (claims(exp=int(NOW) - 10), 30, True),
        (claims(exp=int(NOW) - 30), 30, True),
        (claims(exp=int(NOW) - 31), 30, False),
        (claims(exp=int(NOW) - 1), 0, False),
        (claims(exp=int(NOW)), 0, True),
        (claims(nbf=int(NOW) + 20), 30, True),
        (claims(nbf=int(NOW) + 31), 30, False),
        (claims(nbf=int(NOW) + 1), 0, False),
        (claims(nbf=int(NOW)), 0, True),
    ],
)
def test_leeway(payload: dict[str, Any], leeway_s: float, ok: bool) -> None:
    """exp and nbf are judged with the configured leeway."""
    v = verifier(leeway_s=leeway_s)
    if ok:
        assert v.verify(bearer(hs256(payload))).sub == SUB
    else:
        with pytest.raises(Unauthorized):
            v.verify(bearer(hs256(payload)))


def test_tampered_payload() -> None:
    """Changing the payload after signing breaks the signature."""
    header, _, signature = hs256(claims()).split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    with pytest.raises(Unauthorized, match="signature"):
        verifier().verify(bearer(f"{header}.{forged}.{signature}"))


def test_tampered_signature() -> None:
    """A signature that is not the token's own is refused."""
    header, payload, signature = hs256(claims()).split(".")
    other = hs256(claims(sub="someone")).split(".")[2]
    assert other != signature
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(f"{header}.{payload}.{other}"))


def test_wrong_secret() -> None:
    """A token signed with another secret is refused."""
    with pytest.raises(Unauthorized, match="signature"):
        verifier().verify(bearer(hs256(claims(), secret=OTHER_SECRET)))


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg: str) -> None:
    """An unsigned token (alg none) never passes."""
    token = hand_token({"alg": alg, "typ": "JWT"}, claims(), None)
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(token))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused(alg: str) -> None:
    """The secret pins HS256: the same secret under another algorithm is refused."""
    token = jwt.encode(claims(), SECRET, algorithm=alg)
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(token))


@pytest.mark.parametrize(
    "token", ["a.b.c", "not-a-jwt.at.all", "e30.e30.", "....", "x" * 10_000 + ".e30.e30"]
)
def test_garbage_tokens(token: str) -> None:
    """Tokens that are not JWTs are UNAUTHORIZED, not an internal error."""
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(token))


@pytest.mark.parametrize(
    ("configured", "token_claims", "ok"),
    [
        ({"audience": "hydrobit"}, claims(aud="hydrobit"), True),
        ({"audience": "hydrobit"}, claims(aud=["other", "hydrobit"]), True),
        ({"audience": "hydrobit"}, claims(aud="other"), False),
        ({"audience": "hydrobit"}, claims(), False),
        ({"issuer": "https://auth.hydrobit.ag/"}, claims(iss="https://auth.hydrobit.ag/"), True),
        ({"issuer": "https://auth.hydrobit.ag/"}, claims(iss="https://evil.example/"), False),
        ({"issuer": "https://auth.hydrobit.ag/"}, claims(), False),
        ({}, claims(aud="anything", iss="anyone"), True),
    ],
)
def test_audience_and_issuer(
    configured: dict[str, str], token_claims: dict[str, Any], ok: bool
) -> None:
    """aud and iss are checked when configured, and ignored otherwise."""
    v = verifier(audience=configured.get("audience"), issuer=configured.get("issuer"))
    if ok:
        assert v.verify(bearer(hs256(token_claims))).sub == SUB
    else:
        with pytest.raises(Unauthorized):
            v.verify(bearer(hs256(token_claims)))


def test_unknown_kid_is_refused() -> None:
    """A kid that no configured key has is refused, and remembered for a JWKS refresh."""
    v = verifier()
    with pytest.raises(Unauthorized, match="unknown key"):
        v.verify(bearer(hs256(claims(), kid="key-2024")))
    assert "key-2024" in v.unknown_kids


def test_non_string_kid_is_refused() -> None:
    """A kid that is not a string is refused."""
    token = hand_token({"alg": "HS256", "typ": "JWT", "kid": 7}, claims(), SECRET.encode())
    with pytest.raises(Unauthorized):
        verifier().verify(bearer(token))


def test_no_keys_at_all() -> None:
    """Without any key configured nothing verifies."""
    with pytest.raises(Unauthorized):
        verifier(KeyRing()).verify(bearer(hs256(claims())))


# --- the cache -------------------------------------------------------------------------------


def test_cache_returns_the_same_claims() -> None:
    """A second verify of the same token returns the remembered claims."""
    v = verifier()
    token = bearer(hs256(claims()))
    first = v.verify(token)
    assert v.verify(token) is first


def test_cache_rechecks_exp_on_a_hit() -> None:
    """A cached token is refused once the clock passes its exp (plus leeway)."""
    clock = Clock()
    v = verifier(clock=clock, leeway_s=30)
    token = bearer(hs256(claims(exp=int(NOW) + 60)))
    assert v.verify(token).sub == SUB
    clock.now = NOW + 60 + 30
    assert v.verify(token).sub == SUB
    clock.now = NOW + 60 + 31
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(token)
    with pytest.raises(Unauthorized, match="expired"):
        v.verify(token)


def test_cache_stays_bounded() -> None:
    """However many distinct tokens arrive, the cache keeps at most cache_size of them."""
    v = verifier(cache_size=8)
    for i in range(50):
        v.verify(bearer(hs256(claims(sub=f"user_{i}"))))
        assert len(v._cache) <= 8


def test_cache_evicts_the_oldest() -> None:
    """Evicted tokens are verified afresh (seen by rotating the secret); recent ones are hits."""
    keys = KeyRing(secret=SECRET)
    v = verifier(keys, cache_size=8)
    tokens = [bearer(hs256(claims(sub=f"user_{i}"))) for i in range(20)]
    for token in tokens:
        v.verify(token)
    keys.secret = OTHER_SECRET
    with pytest.raises(Unauthorized):
        v.verify(tokens[0])
    assert v.verify(tokens[-1]).sub == "user_19"


def test_refused_tokens_are_not_cached() -> None:
    """A token refused once is refused again (a failure is not remembered as a success)."""
    v = verifier()
    token = bearer(hs256(claims(), secret=OTHER_SECRET))
    for _ in range(2):
        with pytest.raises(Unauthorized):
            v.verify(token)


# --- JWKS (RS256 / ES256) ----------------------------------------------------------------------


@dataclass(frozen=True)
class Jwks:
    rsa_private: rsa.RSAPrivateKey
    ec_private: ec.EllipticCurvePrivateKey
    rsa_public_pem: bytes
    document: dict[str, Any]


@pytest.fixture(scope="module")
def jwks() -> Jwks:
    """An RSA and an EC P-256 key published as a JWKS with kids and algs."""
    rsa_private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_private = ec.generate_private_key(ec.SECP256R1())
    rsa_jwk = RSAAlgorithm.to_jwk(rsa_private.public_key(), as_dict=True)
    ec_jwk = ECAlgorithm.to_jwk(ec_private.public_key(), as_dict=True)
    rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
    ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
    pem = rsa_private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Jwks(rsa_private, ec_private, pem, {"keys": [rsa_jwk, ec_jwk]})


def test_rs256_token_verifies(jwks: Jwks) -> None:
    """An RS256 token whose kid is in the JWKS verifies."""
    token = jwt.encode(claims(), jwks.rsa_private, algorithm="RS256", headers={"kid": "rsa-1"})
    v = verifier(KeyRing(jwks=jwks.document))
    assert v.verify(bearer(token)) == Claims(sub=SUB, exp=NOW + 3600)


def test_es256_token_verifies(jwks: Jwks) -> None:
    """An ES256 token whose kid is in the JWKS verifies."""
    token = jwt.encode(claims(), jwks.ec_private, algorithm="ES256", headers={"kid": "ec-1"})
    v = verifier(KeyRing(jwks=jwks.document))
    assert v.verify(bearer(token)).sub == SUB


def test_jwks_and_secret_together(jwks: Jwks) -> None:
    """With both configured, HS256 (no kid) and RS256 (kid) tokens both verify."""
    v = verifier(KeyRing(secret=SECRET, jwks=jwks.document))
    rs = jwt.encode(claims(sub="a"), jwks.rsa_private, algorithm="RS256", headers={"kid": "rsa-1"})
    assert v.verify(bearer(rs)).sub == "a"
    assert v.verify(bearer(hs256(claims(sub="b")))).sub == "b"


def test_algorithm_confusion_is_refused(jwks: Jwks) -> None:
    """HS256 signed with the RSA public key PEM as secret, carrying the RSA kid, is refused."""
    token = hand_token(
        {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(), jwks.rsa_public_pem
    )
    for keys in (KeyRing(jwks=jwks.document), KeyRing(secret=SECRET, jwks=jwks.document)):
        with pytest.raises(Unauthorized):
            verifier(keys).verify(bearer(token))


def test_algorithm_confusion_without_kid_is_refused(jwks: Jwks) -> None:
    """The same forgery without a kid is refused too (it is checked against the real secret)."""
    token = hand_token({"alg": "HS256", "typ": "JWT"}, claims(), jwks.rsa_public_pem)
    for keys in (KeyRing(jwks=jwks.document), KeyRing(secret=SECRET, jwks=jwks.document)):
        with pytest.raises(Unauthorized):
            verifier(keys).verify(bearer(token))


def test_key_pins_the_algorithm(jwks: Jwks) -> None:
    """An ES256 token claiming the RSA kid (or RS256 claiming the EC kid) is refused."""
    v = verifier(KeyRing(jwks=jwks.document))
    es = jwt.encode(claims(), jwks.ec_private, algorithm="ES256", headers={"kid": "rsa-1"})
    rs = jwt.encode(claims(), jwks.rsa_private, algorithm="RS256", headers={"kid": "ec-1"})
    for token in (es, rs):
        with pytest.raises(Unauthorized):
            v.verify(bearer(token))


def test_alg_none_with_a_jwks_kid_is_refused(jwks: Jwks) -> None:
    """An unsigned token naming a JWKS kid is refused."""
    token = hand_token({"alg": "none", "typ": "JWT", "kid": "rsa-1"}, claims(), None)
    with pytest.raises(Unauthorized):
        verifier(KeyRing(jwks=jwks.document)).verify(bearer(token))


def test_jwks_token_needs_a_kid(jwks: Jwks) -> None:
    """With only a JWKS, a token without kid is refused."""
    token = jwt.encode(claims(), jwks.rsa_private, algorithm="RS256")
    with pytest.raises(Unauthorized, match="kid"):
        verifier(KeyRing(jwks=jwks.document)).verify(bearer(token))


def test_rs256_without_kid_is_not_tried_against_the_secret(jwks: Jwks) -> None:
    """With a secret and a JWKS, an RS256 token without kid is refused."""
    token = jwt.encode(claims(), jwks.rsa_private, algorithm="RS256")
    with pytest.raises(Unauthorized):
        verifier(KeyRing(secret=SECRET, jwks=jwks.document)).verify(bearer(token))


def test_unknown_jwks_kid(jwks: Jwks) -> None:
    """A token signed by a key outside the JWKS (unknown kid) is refused."""
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-2"})
    v = verifier(KeyRing(jwks=jwks.document))
    with pytest.raises(Unauthorized):
        v.verify(bearer(token))
    assert v.unknown_kids == {"rsa-2"}


def test_forged_kid_with_wrong_key(jwks: Jwks) -> None:
    """A token signed by another RSA key but naming a known kid fails its signature."""
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), stranger, algorithm="RS256", headers={"kid": "rsa-1"})
    with pytest.raises(Unauthorized, match="signature"):
        verifier(KeyRing(jwks=jwks.document)).verify(bearer(token))


def test_symmetric_keys_in_a_jwks_are_ignored() -> None:
    """An 'oct' key in the JWKS cannot verify anything: JWKS keys are RS256/ES256 only."""
    oct_jwk = {"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": b64(SECRET.encode())}
    keys = KeyRing(jwks={"keys": [oct_jwk]})
    assert not keys.has_jwks
    token = hs256(claims(), kid="hmac-1")
    with pytest.raises(Unauthorized):
        verifier(keys).verify(bearer(token))


def test_replace_jwks_drops_old_keys(jwks: Jwks) -> None:
    """After a JWKS refresh without the RSA key, RSA tokens are refused."""
    keys = KeyRing(jwks=jwks.document)
    keys.replace_jwks({"keys": [k for k in jwks.document["keys"] if k["kid"] == "ec-1"]})
    token = jwt.encode(claims(), jwks.rsa_private, algorithm="RS256", headers={"kid": "rsa-1"})
    assert keys.by_kid("rsa-1") is None
    with pytest.raises(Unauthorized):
        verifier(keys).verify(bearer(token))


def test_jwks_claims_are_checked(jwks: Jwks) -> None:
    """JWKS tokens get the same exp, sub, audience checks as HS256 ones."""
    v = verifier(KeyRing(jwks=jwks.document), audience="hydrobit")
    for payload in (claims(aud="hydrobit", exp=int(NOW) - 600), claims(aud="x"), claims(sub=...)):
        token = jwt.encode(payload, jwks.ec_private, algorithm="ES256", headers={"kid": "ec-1"})
        with pytest.raises(Unauthorized):
            v.verify(bearer(token))


@pytest.mark.parametrize("claim", ["exp", "nbf"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_time_claim_that_is_not_finite_is_refused(claim: str, value: float) -> None:
    """exp NaN or Infinity never expired (and nbf NaN was ignored): refused."""
    with pytest.raises(Unauthorized, match=claim):
        verifier().verify(bearer(hs256(claims(**{claim: value}))))


def test_an_unknown_kid_is_not_echoed_in_full() -> None:
    """An attacker's 20 KB kid came back whole in the error."""
    with pytest.raises(Unauthorized) as info:
        verifier().verify(bearer(hs256(claims(), kid="k" * 20_000)))
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    ("carried", "in_payload", "taken"),
    [
        ("Bearer a.b.c", None, "Bearer a.b.c"),
        (None, "Bearer a.b.c", "Bearer a.b.c"),
        ("", "Bearer a.b.c", "Bearer a.b.c"),
        ("Bearer a.b.c", "Bearer a.b.c", "Bearer a.b.c"),
        ("Bearer a.b.c", "Bearer x.y.z", AMBIGUOUS_AUTHORIZATION),
        (None, None, None),
    ],
)
def test_one_authorization_from_property_and_payload(
    carried: str | None, in_payload: str | None, taken: str | None
) -> None:
    """A token sent both as user property and in the payload must be the same one."""
    assert one_authorization(carried, in_payload) == taken


def test_padded_copies_of_a_good_token_neither_pass_nor_fill_the_cache() -> None:
    """'Bearer' + 200,000 spaces + a valid token, sent in a flood of different paddings, is
    refused (too long); padded within the limit it verifies but is not remembered, so the
    cache stays small whatever the flood."""
    v = verifier()
    token = hs256(claims())
    with pytest.raises(Unauthorized, match="at most"):
        v.verify("Bearer " + " " * 200_000 + token)
    for pad in range(5_000, 5_010):
        assert v.verify("Bearer " + " " * pad + token).sub == SUB
    assert len(v._cache) == 0
    assert v.verify(bearer(token)).sub == SUB
    assert len(v._cache) == 1
