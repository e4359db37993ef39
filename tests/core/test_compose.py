"""compose.yaml and the image's build context, read as Docker would (no engine here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.cli import build_parser
from gateway.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def services() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    result: dict[str, Any] = data["services"]
    return result


def test_gateway_commands_parse_and_variables_exist() -> None:
    """Every command compose gives the image is one the CLI takes; every GATEWAY_ variable is
    a setting (a typo would be silently ignored at run time)."""
    known = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    built = {name: svc for name, svc in services().items() if svc.get("build") == "."}
    assert set(built) == {"migrate", "gateway"}
    for name, svc in built.items():
        command = svc["command"]
        assert command[0] == "gateway", name
        build_parser().parse_args(command[1:])  # SystemExit on a bad flag
        unknown = {k for k in svc["environment"] if k.startswith("GATEWAY_")} - known
        assert unknown == set(), (name, unknown)


def test_migrate_waits_for_the_database_and_postgres_is_checked_over_tcp() -> None:
    s = services()
    assert "--wait" in s["migrate"]["command"]
    assert "-h 127.0.0.1" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert s["gateway"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_the_image_never_receives_the_broker_secrets() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {"mosquitto/passwd", "mosquitto/certs", ".venv", ".git"} <= ignored


def test_the_secrets_are_required_and_the_share_group_is_one_of_them() -> None:
    """The public default share group would let any device take requests (mosquitto/README):
    compose refuses to start without a group of the deployment's own, as without its secrets."""
    env = services()["gateway"]["environment"]
    for name in ("GATEWAY_SHARE_GROUP", "GATEWAY_MQTT_PASSWORD"):
        assert str(env[name]).startswith(f"${{{name}:?"), name


def test_either_token_key_passes_through() -> None:
    """SPEC §3: a secret and/or a JWKS; compose passes both (and the audience and issuer) from
    the environment, and an unset one arrives empty, which the gateway reads as unset."""
    env = services()["gateway"]["environment"]
    for name in (
        "GATEWAY_JWT_SECRET",
        "GATEWAY_JWT_JWKS",
        "GATEWAY_JWT_AUDIENCE",
        "GATEWAY_JWT_ISSUER",
    ):
        assert env[name] == f"${{{name}:-}}", name


def test_clear_text_ports_are_published_on_loopback_only() -> None:
    """Plain MQTT, plain WebSocket and the HTTP sidecar carry passwords or tokens in clear:
    published on the host's loopback; devices get the TLS listeners."""
    published = {
        str(port).rsplit(":", 1)[-1]: str(port)
        for svc in services().values()
        for port in svc.get("ports", [])
    }
    for clear in ("1883", "9001", "8080"):
        assert published[clear].startswith("127.0.0.1:"), published[clear]
    for tls in ("8883", "9443"):
        assert tls in published
