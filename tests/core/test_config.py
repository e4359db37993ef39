"""Settings of SPEC §6: defaults, GATEWAY_* variables, and errors that name the variable."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import (
    BROKER_MESSAGE_SIZE_LIMIT,
    MqttEndpoint,
    Settings,
    advice,
    load_settings,
    unknown_settings,
)
from gateway.errors import ConfigError

GOOD_SECRET = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without any GATEWAY_* variable from the surrounding shell."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    """Without any variable the settings are the documented defaults."""
    s = load_settings()
    assert isinstance(s, Settings)
    assert s.mqtt_url == "mqtt://127.0.0.1:1883"
    assert s.database_url.startswith("postgresql://")
    assert s.topic_prefix == "hydrobit/v2"
    assert s.share_group == "hydrobit-gateway"
    assert s.mqtt_client_id == f"hydrobit-gateway-{socket.gethostname()}"
    assert s.mqtt_session_expiry_s == 86_400
    assert s.http_port == 8080
    assert s.max_payload_bytes == 262_144
    assert s.max_bulk == 1_000
    assert s.max_session_hours == 48
    assert s.clock_skew_s == 300
    assert s.late_sync_grace_s == 0
    assert s.state_retain_s == 7 * 86_400
    assert s.jwt_secret is None
    assert s.jwt_jwks is None
    assert s.jwt_audience is None
    assert s.jwt_issuer is None
    assert s.cors_origins == "*"


def test_settings_are_frozen() -> None:
    """Settings are built once and cannot be changed afterwards."""
    s = load_settings()
    with pytest.raises(ValidationError, match="frozen"):
        s.max_bulk = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("GATEWAY_MQTT_URL", "ws://broker:9001/mqtt", "mqtt_url", "ws://broker:9001/mqtt"),
        ("GATEWAY_TOPIC_PREFIX", "acme/v3", "topic_prefix", "acme/v3"),
        ("GATEWAY_JWT_AUDIENCE", "", "jwt_audience", None),  # VAR= is unset
        ("GATEWAY_JWT_JWKS", "", "jwt_jwks", None),
        ("GATEWAY_MAX_UNITS", "1e12", "max_units", 1e12),
        ("GATEWAY_SHARE_GROUP", "gw-blue", "share_group", "gw-blue"),
        ("GATEWAY_MQTT_CLIENT_ID", "gw-replica-2", "mqtt_client_id", "gw-replica-2"),
        ("GATEWAY_MAX_BULK", "50", "max_bulk", 50),
        ("GATEWAY_MAX_SESSION_HOURS", "72", "max_session_hours", 72),
        ("GATEWAY_LATE_SYNC_GRACE_S", "900", "late_sync_grace_s", 900),
        ("GATEWAY_CLOCK_SKEW_S", "0", "clock_skew_s", 0),
        ("GATEWAY_JWT_SECRET", GOOD_SECRET, "jwt_secret", GOOD_SECRET),
        ("GATEWAY_JWT_AUDIENCE", "hydrobit", "jwt_audience", "hydrobit"),
        ("GATEWAY_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("GATEWAY_HTTP_PORT", "0", "http_port", 0),
    ],
)
def test_env_overrides(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, attr: str, expected: object
) -> None:
    """Each GATEWAY_* variable sets its setting."""
    monkeypatch.setenv(var, value)
    assert getattr(load_settings(), attr) == expected


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GATEWAY_MQTT_URL", "http://broker:1883"),
        ("GATEWAY_MQTT_URL", "tcp://broker:1883"),
        ("GATEWAY_MQTT_URL", "mqtt://"),
        ("GATEWAY_MQTT_URL", "broker:1883"),
        ("GATEWAY_DATABASE_URL", "mysql://u@h/db"),
        ("GATEWAY_MAX_BULK", "-1"),
        ("GATEWAY_MAX_BULK", "0"),
        ("GATEWAY_MAX_BULK", "many"),
        ("GATEWAY_MAX_UNITS", "-5"),
        ("GATEWAY_MAX_SESSION_HOURS", "-1"),
        ("GATEWAY_MAX_PAYLOAD_BYTES", "-1"),
        ("GATEWAY_CLOCK_SKEW_S", "-1"),
        ("GATEWAY_LATE_SYNC_GRACE_S", "-60"),
        ("GATEWAY_STATE_RETAIN_S", "0"),
        ("GATEWAY_MQTT_SESSION_EXPIRY_S", "-1"),
        ("GATEWAY_HTTP_PORT", "70000"),
        ("GATEWAY_TOPIC_PREFIX", "hydrobit/+/v2"),
        ("GATEWAY_TOPIC_PREFIX", "hydrobit/#"),
        ("GATEWAY_TOPIC_PREFIX", "$SYS/hydrobit"),
        ("GATEWAY_TOPIC_PREFIX", "/"),
        ("GATEWAY_TOPIC_PREFIX", "/acme/v3/"),
        ("GATEWAY_TOPIC_PREFIX", "acme//v3"),
        ("GATEWAY_MAX_UNITS", "inf"),
        ("GATEWAY_MAX_UNITS", "nan"),
        ("GATEWAY_MAX_UNITS", "1e308"),
        ("GATEWAY_SHARE_GROUP", "a/b"),
        ("GATEWAY_SHARE_GROUP", "g+"),
        ("GATEWAY_LOG_LEVEL", "LOUD"),
        ("GATEWAY_LOG_FORMAT", "xml"),
        ("GATEWAY_CORS_ORIGINS", "example.com"),
        ("GATEWAY_CORS_ORIGINS", "https://ok.example,ftp://files.example"),
        ("GATEWAY_CORS_ORIGINS", "https://app.example/path"),
        ("GATEWAY_MQTT_CA_FILE", "/nonexistent/ca.pem"),
        ("GATEWAY_MQTT_CA_FILE", "/etc/hostname"),
    ],
)
def test_bad_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    """A bad value is a ConfigError whose message names the GATEWAY_ variable."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert var in str(info.value)


@pytest.mark.parametrize("secret", ["short", "x" * 31, "ü" * 15])
def test_short_jwt_secret(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    """A JWT secret under 32 bytes is refused, naming GATEWAY_JWT_SECRET."""
    monkeypatch.setenv("GATEWAY_JWT_SECRET", secret)
    with pytest.raises(ConfigError, match="GATEWAY_JWT_SECRET") as caught:
        load_settings()
    assert str(caught.value).splitlines()[1].startswith("  GATEWAY_JWT_SECRET must be")


def test_overrides_are_checked_like_env() -> None:
    """Keyword overrides go through the same checks."""
    with pytest.raises(ConfigError, match="GATEWAY_MQTT_URL"):
        load_settings(mqtt_url="http://x")


def test_require_jwt_keys() -> None:
    """Serving needs GATEWAY_JWT_SECRET or GATEWAY_JWT_JWKS; the error names both."""
    with pytest.raises(ConfigError) as info:
        load_settings().require_jwt_keys()
    assert "GATEWAY_JWT_SECRET" in str(info.value)
    assert "GATEWAY_JWT_JWKS" in str(info.value)
    load_settings(jwt_secret=GOOD_SECRET).require_jwt_keys()
    load_settings(jwt_jwks="/etc/hydrobit/jwks.json").require_jwt_keys()


def test_database_display_hides_the_password() -> None:
    """The database URL shown in logs has no password."""
    s = load_settings(database_url="postgresql://gw:s3cret@db.internal:6432/hydrobit")
    assert "s3cret" not in s.database_display
    assert s.database_display == "postgresql://gw@db.internal:6432/hydrobit"


@pytest.mark.parametrize(
    ("url", "user", "password", "shown"),
    [
        ("mqtt://gw:s%40cr%3Aet@broker:1884", "gw", "s@cr:et", "mqtt://gw@broker:1884"),
        ("wss://gw:pw@iot.example/ws", "gw", "pw", "wss://gw@iot.example:443/ws"),
        ("mqtt://gw@[::1]", "gw", None, "mqtt://gw@[::1]:1883"),
        ("ws://127.0.0.1:9001", None, None, "ws://127.0.0.1:9001/mqtt"),
    ],
)
def test_a_login_in_the_mqtt_url_is_used_and_hidden(
    url: str, user: str | None, password: str | None, shown: str
) -> None:
    """mqtt://user:password@host logs in as that user (it was ignored); logs show the URL
    without the password."""
    s = load_settings(mqtt_url=url)
    assert (s.broker_username, s.broker_password) == (user, password)
    assert s.mqtt_display == shown


def test_the_mqtt_login_is_given_once() -> None:
    """A login in the URL and in GATEWAY_MQTT_USERNAME/PASSWORD: which one is meant?"""
    s = load_settings(mqtt_username="gw", mqtt_password="pw")
    assert (s.broker_username, s.broker_password) == ("gw", "pw")
    for extra in ({"mqtt_username": "gw"}, {"mqtt_password": "pw"}):
        with pytest.raises(ConfigError, match="give the login once") as info:
            load_settings(mqtt_url="mqtt://other:secret@broker", **extra)
        assert "secret" not in str(info.value)


def test_a_login_in_the_url_counts_for_the_share_group_advice() -> None:
    assert "GATEWAY_SHARE_GROUP" in advice(load_settings(mqtt_url="mqtt://gw:pw@b"))[0]


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "path", "websocket", "tls"),
    [
        ("mqtt://broker", "mqtt", "broker", 1883, "/mqtt", False, False),
        ("mqtt://broker:1884", "mqtt", "broker", 1884, "/mqtt", False, False),
        ("mqtts://broker", "mqtts", "broker", 8883, "/mqtt", False, True),
        ("ws://broker:9001/mqtt", "ws", "broker", 9001, "/mqtt", True, False),
        ("ws://broker:9001", "ws", "broker", 9001, "/mqtt", True, False),
        ("wss://iot.hydrobit.ag:8443/ws", "wss", "iot.hydrobit.ag", 8443, "/ws", True, True),
        ("mqtt://127.0.0.1:1883", "mqtt", "127.0.0.1", 1883, "/mqtt", False, False),
        ("mqtt://[::1]:1883", "mqtt", "::1", 1883, "/mqtt", False, False),
    ],
)
def test_mqtt_endpoint(
    url: str, scheme: str, host: str, port: int, path: str, websocket: bool, tls: bool
) -> None:
    """GATEWAY_MQTT_URL gives scheme, host, port (default per scheme) and WebSocket path."""
    e = MqttEndpoint(url)
    assert (e.scheme, e.host, e.port, e.path) == (scheme, host, port, path)
    assert (e.websocket, e.tls) == (websocket, tls)


@pytest.mark.parametrize(
    ("url", "port"),
    [
        pytest.param("wss://iot.hydrobit.ag/", 443, id="seeds-wss-endpoint"),
        pytest.param("wss://iot.hydrobit.ag/mqtt", 443, id="wss-no-port"),
    ],
)
def test_wss_without_port_is_443(url: str, port: int) -> None:
    """wss:// without a port means 443 (RFC 6455): the seeds' endpoint wss://iot.hydrobit.ag/."""
    assert MqttEndpoint(url).port == port


def test_settings_expose_the_endpoint() -> None:
    """Settings.mqtt is the parsed GATEWAY_MQTT_URL."""
    e = load_settings(mqtt_url="mqtts://broker.example:8884").mqtt
    assert (e.host, e.port, e.tls) == ("broker.example", 8884, True)


@pytest.mark.parametrize("url", ["http://broker", "tcp://broker:1883", "mqtt://", "ws:///mqtt", ""])
def test_mqtt_endpoint_refusals(url: str) -> None:
    """Unsupported schemes and URLs without a host are refused."""
    with pytest.raises(ValueError, match=r"scheme|host"):
        MqttEndpoint(url)


def test_every_setting_is_in_the_readme() -> None:
    """The README's configuration table names every GATEWAY_ variable the gateway reads."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [
        f"GATEWAY_{name.upper()}"
        for name in Settings.model_fields
        if f"`GATEWAY_{name.upper()}`" not in readme
    ]
    assert missing == []


def test_log_format_ignores_case(monkeypatch: pytest.MonkeyPatch) -> None:
    """GATEWAY_LOG_FORMAT=JSON is json, as GATEWAY_LOG_LEVEL=info is INFO."""
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "TEXT")
    assert load_settings().log_format == "text"


def test_unknown_settings_are_named_with_the_one_meant() -> None:
    """GATEWAY_MAX_BULKK=5 sets nothing: `gateway run` warns, naming GATEWAY_MAX_BULK."""
    environ = {
        "GATEWAY_MAX_BULKK": "5",
        "GATEWAY_ZZZ": "1",
        "GATEWAY_MAX_BULK": "10",
        "HOME": "/root",
    }
    assert unknown_settings(environ) == [
        "GATEWAY_MAX_BULKK (did you mean GATEWAY_MAX_BULK?)",
        "GATEWAY_ZZZ",
    ]


def test_a_payload_limit_above_the_brokers_is_advised_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between the broker's limit and the gateway's a payload would be dropped unanswered."""
    assert advice(load_settings()) == []
    monkeypatch.setenv("GATEWAY_MAX_PAYLOAD_BYTES", str(BROKER_MESSAGE_SIZE_LIMIT))
    assert advice(load_settings()) == []
    monkeypatch.setenv("GATEWAY_MAX_PAYLOAD_BYTES", "2000000")
    (text,) = advice(load_settings())
    assert "GATEWAY_MAX_PAYLOAD_BYTES=2000000" in text and "message_size_limit" in text


def test_the_default_share_group_on_a_broker_with_logins_is_advised_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Anonymous (gateway dev, tests): the default is fine; with a broker login it is the
    public name any device could subscribe to."""
    assert advice(load_settings()) == []
    monkeypatch.setenv("GATEWAY_MQTT_USERNAME", "hydrobit-gateway")
    (text,) = advice(load_settings())
    assert "GATEWAY_SHARE_GROUP" in text and "secret" in text
    monkeypatch.setenv("GATEWAY_SHARE_GROUP", "gw-3f9c27a1d04b6e58")
    assert advice(load_settings()) == []


def test_the_broker_limit_named_is_the_one_configured() -> None:
    """BROKER_MESSAGE_SIZE_LIMIT follows mosquitto/*.conf."""
    root = Path(__file__).resolve().parents[2] / "mosquitto"
    for conf in ("mosquitto.conf", "production.conf"):
        lines = (root / conf).read_text().splitlines()
        limits = [ln.split()[1] for ln in lines if ln.startswith("message_size_limit ")]
        assert limits == [str(BROKER_MESSAGE_SIZE_LIMIT)], conf


def test_an_empty_secret_beside_a_jwks_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """GATEWAY_JWT_SECRET= (compose's ${GATEWAY_JWT_SECRET:-}) beside a JWKS is no secret,
    not a too-short one."""
    monkeypatch.setenv("GATEWAY_JWT_SECRET", "")
    monkeypatch.setenv("GATEWAY_JWT_JWKS", "/etc/hydrobit/jwks.json")
    s = load_settings()
    assert (s.jwt_secret, s.jwt_jwks) == (None, "/etc/hydrobit/jwks.json")
    s.require_jwt_keys()


def test_a_jwks_without_an_audience_is_advised_against() -> None:
    """With GATEWAY_JWT_JWKS (a shared identity provider, Auth0 say) and no audience, every
    token that provider signs for any other API, ID tokens too, is taken here."""
    (text,) = advice(load_settings(jwt_jwks="/etc/hydrobit/jwks.json"))
    assert "GATEWAY_JWT_AUDIENCE" in text
    assert advice(load_settings(jwt_jwks="/etc/hydrobit/jwks.json", jwt_audience="hb")) == []
    assert advice(load_settings(jwt_secret="s" * 32)) == []  # a secret of our own: ours alone
