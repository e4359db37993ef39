"""The command line's own help: what a deployer reads before the README."""

from __future__ import annotations

import pytest

from gateway.cli import build_parser
from gateway.config import Settings


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
