"""render_mosquitto_config: the project's broker config with loopback ports and private paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.devstack import render_mosquitto_config

PROJECT_CONF = Path(__file__).resolve().parents[2] / "mosquitto" / "mosquitto.conf"


def directives(text: str) -> list[list[str]]:
    """The non-comment lines of a mosquitto config, split into words."""
    return [line.split() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def values(text: str, key: str) -> list[str]:
    return [" ".join(words[1:]) for words in directives(text) if words[0] == key]


@pytest.fixture
def rendered(tmp_path: Path) -> str:
    """The project's config rendered for ports 21883/29001 as a non-root user."""
    return render_mosquitto_config(
        PROJECT_CONF, tcp_port=21883, ws_port=29001, state_dir=tmp_path / "state", as_root=False
    )


def test_listeners_are_substituted_on_loopback(rendered: str) -> None:
    """The TCP (1883) and WebSocket (9001) listeners move to the given ports on 127.0.0.1."""
    assert values(rendered, "listener") == ["21883 127.0.0.1", "29001 127.0.0.1"]
    assert "1883" not in values(rendered, "listener")[0].split()
    assert "9001" not in values(rendered, "listener")[1].split()


def test_listener_protocols_follow_their_listeners(rendered: str) -> None:
    """Each listener keeps its protocol line: mqtt for TCP, websockets for devices."""
    words = directives(rendered)
    keys = [w[0] for w in words]
    tcp = keys.index("listener")
    ws = keys.index("listener", tcp + 1)
    assert words[tcp + 1] == ["protocol", "mqtt"]
    assert words[ws + 1] == ["protocol", "websockets"]


def test_persistence_location_is_rewritten(rendered: str, tmp_path: Path) -> None:
    """Persistence stays on and goes to the private state folder."""
    assert values(rendered, "persistence") == ["true"]
    assert values(rendered, "persistence_location") == [f"{tmp_path / 'state'}/"]
    assert "/var/lib/mosquitto/" not in rendered


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("message_size_limit", "1048576"),
        ("max_queued_messages", "5000000"),
        ("set_tcp_nodelay", "true"),
        ("autosave_interval", "10"),
        ("max_inflight_messages", "0"),
        ("allow_anonymous", "true"),
        ("per_listener_settings", "false"),
    ],
)
def test_limits_are_kept(rendered: str, key: str, value: str) -> None:
    """The project's limits and settings reach the dev broker unchanged."""
    assert values(rendered, key) == [value]


def test_logs_go_to_stderr(rendered: str) -> None:
    """The dev broker logs to stderr (captured by the dev stack), once."""
    assert values(rendered, "log_dest") == ["stderr"]


@pytest.mark.parametrize(("as_root", "users"), [(False, []), (True, ["root"])])
def test_user_root_only_as_root(tmp_path: Path, as_root: bool, users: list[str]) -> None:
    """`user root` is added only when running as root (mosquitto would otherwise drop to nobody)."""
    text = render_mosquitto_config(
        PROJECT_CONF, tcp_port=1, ws_port=2, state_dir=tmp_path, as_root=as_root
    )
    assert values(text, "user") == users


def test_a_config_of_our_own(tmp_path: Path) -> None:
    """Extra listeners, TLS files, pid/user lines are disabled; ACL paths become absolute."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    source = conf_dir / "mosquitto.conf"
    source.write_text(
        "\n".join(
            [
                "# a comment with listener 1883 in it",
                "user mosquitto",
                "pid_file /run/mosquitto.pid",
                "log_dest file /var/log/mosquitto.log",
                "include_dir /etc/mosquitto/conf.d",
                "listener 1883",
                "listener 8883",
                "certfile /etc/tls/server.crt",
                "keyfile /etc/tls/server.key",
                "cafile /etc/tls/ca.crt",
                "listener 9001",
                "protocol websockets",
                "acl_file acl",
                "password_file /etc/mosquitto/passwd",
                "persistence_location /var/lib/mosquitto/",
                "message_size_limit 1024",
            ]
        )
        + "\n"
    )
    text = render_mosquitto_config(
        source, tcp_port=11883, ws_port=19001, state_dir=tmp_path / "s", as_root=True
    )
    assert values(text, "listener") == ["11883 127.0.0.1", "19001 127.0.0.1"]
    assert values(text, "user") == ["root"]
    for key in ("pid_file", "include_dir", "certfile", "keyfile", "cafile"):
        assert values(text, key) == []
    assert values(text, "log_dest") == ["stderr"]
    assert values(text, "acl_file") == [str(conf_dir / "acl")]
    assert values(text, "password_file") == ["/etc/mosquitto/passwd"]
    assert values(text, "persistence_location") == [f"{tmp_path / 's'}/"]
    assert values(text, "message_size_limit") == ["1024"]
    assert "# a comment with listener 1883 in it" in text.splitlines()
    assert text.endswith("\n")


@pytest.mark.parametrize("conf", ["mosquitto.conf", "production.conf"])
def test_broker_lets_oversize_payloads_reach_the_gateway(conf: str) -> None:
    """Both brokers accept more than GATEWAY_MAX_PAYLOAD_BYTES, so that a payload over the
    gateway's limit is answered PAYLOAD_TOO_LARGE rather than dropped by the broker (which an
    MQTT 3.1.1 publisher would never learn of)."""
    from gateway.config import Settings

    default = Settings.model_fields["max_payload_bytes"].default
    text = (PROJECT_CONF.parent / conf).read_text()
    [limit] = values(text, "message_size_limit")
    assert int(limit) > default
