"""Settings: every ``GATEWAY_*`` variable of SPEC §6, built once and frozen."""

from __future__ import annotations

import difflib
import socket
import ssl
from collections.abc import Mapping
from functools import cached_property
from urllib.parse import unquote, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.errors import ConfigError

# the registered MQTT ports, and the URL defaults for WebSocket schemes (RFC 6455)
DEFAULT_MQTT_PORTS = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}


class MqttEndpoint:
    """The parts of ``GATEWAY_MQTT_URL`` the transport needs."""

    __slots__ = ("host", "password", "path", "port", "scheme", "username")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_MQTT_PORTS:
            raise ValueError(
                f"unsupported scheme {parts.scheme!r}: use mqtt://, mqtts://, ws:// or wss://"
            )
        if not parts.hostname:
            raise ValueError("the URL has no host, e.g. mqtt://127.0.0.1:1883")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or DEFAULT_MQTT_PORTS[parts.scheme]
        self.path = parts.path or "/mqtt"
        # mqtt://user:password@host: the login, as GATEWAY_MQTT_USERNAME/PASSWORD would give it
        self.username = unquote(parts.username) if parts.username is not None else None
        self.password = unquote(parts.password) if parts.password is not None else None

    def display(self) -> str:
        """The URL without its password, for logs."""
        user = f"{self.username}@" if self.username else ""
        path = self.path if self.websocket else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{user}{host}:{self.port}{path}"

    @property
    def websocket(self) -> bool:
        return self.scheme in ("ws", "wss")

    @property
    def tls(self) -> bool:
        return self.scheme in ("mqtts", "wss")


def _default_client_id() -> str:
    return f"hydrobit-gateway-{socket.gethostname()}"


DEFAULT_SHARE_GROUP = "hydrobit-gateway"  # SPEC §2: published, so secret only when changed


class Settings(BaseSettings):
    """The gateway's configuration, read from ``GATEWAY_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", frozen=True, extra="ignore")

    database_url: str = "postgresql://hydrobit@127.0.0.1:5432/hydrobit"
    database_pool_size: int = Field(default=8, ge=1, le=100)

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_client_id: str = Field(default_factory=_default_client_id, min_length=1, max_length=128)
    mqtt_session_expiry_s: int = Field(default=86_400, ge=1, le=4_294_967_295)
    mqtt_keepalive_s: int = Field(default=30, ge=5, le=3600)
    mqtt_ca_file: str | None = None
    mqtt_tls_insecure: bool = False

    topic_prefix: str = "hydrobit/v2"
    share_group: str = DEFAULT_SHARE_GROUP

    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    # browser origins allowed to call the HTTP sidecar: "*", a comma-separated list, or ""
    cors_origins: str = "*"

    jwt_secret: str | None = None
    jwt_jwks: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway_s: int = Field(default=30, ge=0, le=600)

    max_payload_bytes: int = Field(default=262_144, ge=1024, le=268_435_455)
    max_json_depth: int = Field(default=16, ge=2, le=512)
    max_bulk: int = Field(default=1_000, ge=1, le=100_000)
    # finite and far below float overflow: a session's totals sum up to a million of them
    max_units: float = Field(default=100_000, gt=0, le=1e12, allow_inf_nan=False)
    max_session_hours: float = Field(default=48, gt=0, le=24 * 366)
    late_sync_grace_s: int = Field(default=0, ge=0)
    clock_skew_s: int = Field(default=300, ge=0)
    state_retain_s: int = Field(default=7 * 86_400, ge=1, le=4_294_967_295)
    rate_limit_per_s: float = Field(default=0, ge=0, description="0 means no limit")
    rate_limit_burst: int = Field(default=0, ge=0, description="0 means twice the rate")

    batch_max: int = Field(default=500, ge=1, le=10_000)
    batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    pipeline_depth: int = Field(default=2, ge=1, le=16)
    max_inflight: int = Field(default=2_000, ge=1, le=60_000)
    sweep_interval_s: float = Field(default=5.0, gt=0)
    state_interval_s: float = Field(default=0.25, gt=0)
    # how often a running gateway re-announces `online` (retained): with several replicas one's
    # clean stop or crash (will) would otherwise leave `offline` standing while others serve
    status_interval_s: float = Field(default=30.0, gt=0)
    shutdown_timeout_s: float = Field(default=10.0, gt=0)
    dead_letter_payload_cap: int = Field(default=4_096, ge=0)

    log_level: str = "INFO"
    log_format: str = Field(default="json", pattern="^(json|text)$")

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("must look like postgresql://user:password@host:5432/dbname")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        MqttEndpoint(value)
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "+#\x00") or value.startswith("$"):
            raise ValueError("must be a plain topic path such as hydrobit/v2 (no + # or $)")
        if "" in value.split("/"):
            raise ValueError(
                f"{value!r} has an empty topic level (a leading, trailing or double /): "
                "write it as devices do, such as hydrobit/v2"
            )
        return value

    @field_validator(
        "jwt_secret",
        "jwt_jwks",
        "jwt_audience",
        "jwt_issuer",
        "mqtt_username",
        "mqtt_password",
        "mqtt_ca_file",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """VAR= (as compose writes an unset ${VAR:-}) means not set, not an empty key."""
        return None if value == "" else value

    @field_validator("share_group")
    @classmethod
    def _check_group(cls, value: str) -> str:
        if not value or any(c in value for c in "/+#\x00"):
            raise ValueError("must be a single topic level without / + #")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, value: str) -> str:
        for origin in (o.strip() for o in value.split(",")):
            if not origin or origin == "*":
                continue
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/"):
                raise ValueError(
                    f"{origin!r} is not an origin: use *, or a comma-separated list such as "
                    "https://app.example.com,http://localhost:3000"
                )
        return value

    @field_validator("mqtt_ca_file")
    @classmethod
    def _check_ca_file(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ssl.create_default_context(cafile=value)
        except FileNotFoundError:
            raise ValueError(f"{value} does not exist: give the PEM file of the CA") from None
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"{value} is not a PEM CA certificate ({exc})") from None
        return value

    @field_validator("log_format", mode="before")
    @classmethod
    def _fold_format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("log_level")
    @classmethod
    def _check_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return value

    @model_validator(mode="after")
    def _check_jwt_keys(self) -> Settings:
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ValueError(
                "GATEWAY_JWT_SECRET must be at least 32 bytes for HS256 "
                "(generate one with: python3 -c 'import secrets; print(secrets.token_hex(32))')"
            )
        return self

    @model_validator(mode="after")
    def _check_mqtt_login(self) -> Settings:
        endpoint = MqttEndpoint(self.mqtt_url)
        if endpoint.username is not None and (self.mqtt_username or self.mqtt_password):
            raise ValueError(
                "GATEWAY_MQTT_URL carries a login and GATEWAY_MQTT_USERNAME or "
                "GATEWAY_MQTT_PASSWORD is set too: give the login once (the variables keep "
                "the password out of the URL)"
            )
        return self

    @cached_property
    def mqtt(self) -> MqttEndpoint:
        return MqttEndpoint(self.mqtt_url)

    @property
    def broker_username(self) -> str | None:
        """The broker login: GATEWAY_MQTT_USERNAME, else the user in GATEWAY_MQTT_URL."""
        return self.mqtt_username or self.mqtt.username or None

    @property
    def broker_password(self) -> str | None:
        return self.mqtt_password or self.mqtt.password

    @property
    def mqtt_display(self) -> str:
        """The broker URL without its password, for logs."""
        return self.mqtt.display()

    @property
    def database_display(self) -> str:
        """The database URL without its password, for logs."""
        parts = urlsplit(self.database_url)
        host = parts.hostname or ""
        user = unquote(parts.username or "")
        return f"{parts.scheme}://{user}@{host}:{parts.port or 5432}{parts.path}"

    def require_jwt_keys(self) -> None:
        """Refuse to serve without a way to verify tokens."""
        if not self.jwt_secret and not self.jwt_jwks:
            raise ConfigError(
                "no JWT key configured: set GATEWAY_JWT_SECRET (HS256, >= 32 bytes) "
                "and/or GATEWAY_JWT_JWKS (path or https URL of a JWKS)"
            )


def load_settings(**overrides: object) -> Settings:
    """Build the settings once, turning pydantic's errors into one readable ConfigError."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = str(err["msg"]).removeprefix("Value error, ")
            # a check across settings names its variables itself
            lines.append(f"  GATEWAY_{loc.upper()}: {msg}" if loc else f"  {msg}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


# mosquitto's message_size_limit in mosquitto/*.conf
BROKER_MESSAGE_SIZE_LIMIT = 1_048_576


def advice(settings: Settings) -> list[str]:
    """Settings that are valid but probably not what the operator wants."""
    found = []
    if settings.broker_username and settings.share_group == DEFAULT_SHARE_GROUP:
        found.append(
            f"GATEWAY_SHARE_GROUP is the published default {DEFAULT_SHARE_GROUP!r} on a broker "
            "with logins: a device that subscribes to $share/hydrobit-gateway/... takes requests "
            "away from the gateway; set a group made once and kept secret "
            "(gw- and 16 random hex digits), the same for every replica"
        )
    if settings.max_payload_bytes > BROKER_MESSAGE_SIZE_LIMIT:
        found.append(
            f"GATEWAY_MAX_PAYLOAD_BYTES={settings.max_payload_bytes} is above the "
            f"message_size_limit ({BROKER_MESSAGE_SIZE_LIMIT}) of the project's mosquitto "
            "configuration: raise the broker's limit above it too, or payloads in between are "
            "refused by the broker and never reach the gateway (no reply)"
        )
    if settings.jwt_jwks and not settings.jwt_audience:
        found.append(
            "GATEWAY_JWT_JWKS is set without GATEWAY_JWT_AUDIENCE: every token its identity "
            "provider signs, for any other API (and ID tokens), is accepted here; set the "
            "audience the provider puts in this API's tokens"
        )
    return found


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """``GATEWAY_*`` variables that set nothing (a typo leaves the default in force), each
    with the setting it probably meant."""
    known = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    found = []
    for name in sorted(environ):
        if name.startswith("GATEWAY_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            found.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return found
