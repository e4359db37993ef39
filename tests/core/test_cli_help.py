"""The command line's own help: what a deployer reads before the README."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import build_parser
from gateway.config import Settings

# What each command needs to be told, which its own --help must name.
NEEDS = {
    "run": ["GATEWAY_DATABASE_URL", "GATEWAY_MQTT_URL", "GATEWAY_JWT_SECRET"],
    "dev": ["no GATEWAY_* variable"],
    "retire": ["GATEWAY_MQTT_CLIENT_ID", "GATEWAY_DATABASE_URL", "GATEWAY_MQTT_URL"],
    "migrate": ["GATEWAY_DATABASE_URL"],
    "seed": ["GATEWAY_DATABASE_URL"],
    "dead-letters": ["GATEWAY_DATABASE_URL"],
    "simulate": ["GATEWAY_JWT_SECRET", "GATEWAY_TOPIC_PREFIX"],
    "token": ["GATEWAY_JWT_SECRET"],
}


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_run_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    """gateway run is configured by environment only: its help names every variable."""
    text = help_of("run", capsys)
    for name in Settings.model_fields:
        assert f"GATEWAY_{name.upper()}" in text, name
    assert "GATEWAY_MAX_BULK (default 1000)" in text
    # a default of 0 says what 0 stands for (the README's "2 x rate" read as "(default 0)")
    assert "GATEWAY_RATE_LIMIT_BURST (default 0: 0 means twice the rate)" in text
    assert "GATEWAY_RATE_LIMIT_PER_S (default 0: 0 means no limit)" in text


def test_seed_and_token_help_say_what_they_take(capsys: pytest.CaptureFixture[str]) -> None:
    assert "YAML" in help_of("seed", capsys).replace("yaml", "YAML")
    assert "default 1h" in help_of("token", capsys)


@pytest.mark.parametrize("wait", ["-3", "nan", "inf", "soon"])
def test_migrate_refuses_a_wait_that_is_no_duration(
    wait: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["migrate", f"--wait={wait}"])
    assert done.value.code == 2
    assert "seconds" in capsys.readouterr().err


def commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_listed_here() -> None:
    """A new command gets its line in NEEDS, so that its help is checked below."""
    assert sorted(commands()) == sorted(NEEDS)


@pytest.mark.parametrize("command", sorted(NEEDS))
def test_each_command_says_what_it_does_and_needs(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command's own --help has a description, and it names the GATEWAY_* variables the
    command needs."""
    description = " ".join((commands()[command].description or "").split())
    assert description.count(". ") >= 1, (command, description)  # more than a title
    assert description in " ".join(help_of(command, capsys).split())
    for name in NEEDS[command]:
        assert name in description, (command, name)


def test_token_help_says_the_user_must_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """gateway token cannot check the user: its help says an unknown one is FORBIDDEN."""
    text = " ".join(help_of("token", capsys).split())
    assert "must exist" in text and "FORBIDDEN" in text


def test_version_is_the_one_the_status_message_publishes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """gateway --version prints gateway.__version__, the status message's ``version``."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"gateway {__version__}\n"
    assert __version__ != "0.0.0"  # the installed package's, not the bare-tree fallback


@pytest.mark.parametrize(
    ("audience", "issuer"), [(None, None), ("hydrobit-api", None), ("hb", "https://auth.example/")]
)
def test_dev_tokens_carry_the_configured_audience_and_issuer(
    audience: str | None, issuer: str | None
) -> None:
    """`gateway token` and `gateway simulate --sub` mint one way: a token the configured
    gateway accepts (simulate's left out audience and issuer: every request UNAUTHORIZED)."""
    from gateway.config import load_settings
    from gateway.core.auth import KeyRing, TokenVerifier
    from gateway.devmode import dev_token

    secret = "s" * 32
    settings = load_settings(jwt_secret=secret, jwt_audience=audience, jwt_issuer=issuer)
    token = dev_token(settings, "user_1", 60)
    verifier = TokenVerifier(KeyRing(secret=secret), audience=audience, issuer=issuer)
    assert verifier.verify(f"Bearer {token}").sub == "user_1"


def test_dev_instructions_print_a_token_the_dev_gateway_accepts(tmp_path: Path) -> None:
    """`gateway dev` with GATEWAY_JWT_AUDIENCE / GATEWAY_JWT_ISSUER set printed a token without
    them (its own stack answered UNAUTHORIZED), and an export line that left them out (so the
    printed `gateway token` line, in a new shell, minted the same unusable tokens)."""
    import re
    import shlex

    from gateway.config import load_settings
    from gateway.core.auth import KeyRing, TokenVerifier
    from gateway.devmode import _instructions

    secret = "s" * 32
    settings = load_settings(
        jwt_secret=secret, jwt_audience="hydrobit-api", jwt_issuer="https://auth.example/"
    )
    text = _instructions(settings, 1883, 9001, "s" * 24, tmp_path / "tenants.yaml")
    token = re.search(r"^Token \(24 h\): (\S+)$", text, re.M)
    assert token is not None, text
    verifier = TokenVerifier(
        KeyRing(secret=secret), audience="hydrobit-api", issuer="https://auth.example/"
    )
    assert verifier.verify(f"Bearer {token[1]}").sub == "user_123456789"
    export = next(line for line in text.splitlines() if line.strip().startswith("export "))
    env = dict(word.split("=", 1) for word in shlex.split(export.strip())[1:])
    assert env["GATEWAY_JWT_AUDIENCE"] == "hydrobit-api"
    assert env["GATEWAY_JWT_ISSUER"] == "https://auth.example/"


def test_dead_letters_print_control_characters_escaped() -> None:
    """`gateway dead-letters` printed a refusal's topic and message as sent: an escape sequence
    in a URL or a sessionId cleared the operator's screen or forged a line of output."""
    from gateway.cli import printable

    assert printable("HTTP GET /x\x1b[31mRED\nFORGED") == "HTTP GET /x\\x1b[31mRED\\x0aFORGED"
    assert printable("sessionId \x9b2J\x7f é ✓") == "sessionId \\x9b2J\\x7f é ✓"
    assert printable("plain/topic") == "plain/topic"
