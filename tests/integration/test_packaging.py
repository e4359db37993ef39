"""The wheel (``pip install .``) carries what the installed gateway needs at run time."""

from __future__ import annotations

import configparser
import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.extra_helpers import PROJECT_ROOT, clean_env, run_process

# What an operator creates in mosquitto/ before `docker compose up` (mosquitto/README.md): secrets
# that must never travel inside the wheel (or the image built from it).
SECRETS = ("mosquitto/passwd", "mosquitto/certs/server.key", "mosquitto/certs/ca.crt")


@pytest.fixture(scope="module")
async def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel of a copy of the project in which an operator has created the broker's password
    file and TLS key, built by pip (without build isolation when hatchling is here)."""
    tree = tmp_path_factory.mktemp("tree") / "project"
    shutil.copytree(
        PROJECT_ROOT,
        tree,
        ignore=shutil.ignore_patterns(".venv", ".git", "*_cache", "__pycache__", "results"),
    )
    for secret in SECRETS:
        (tree / secret).parent.mkdir(parents=True, exist_ok=True)
        (tree / secret).write_text("secret\n")
    out = tmp_path_factory.mktemp("wheel")
    argv = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(tree)]
    if importlib.util.find_spec("hatchling") is not None:
        argv.insert(5, "--no-build-isolation")
    done = await run_process(argv, timeout=300, cwd=out)
    assert done.returncode == 0, done
    wheels = list(out.glob("hydrobit_gateway-*.whl"))
    assert len(wheels) == 1, (wheels, done)
    return wheels[0]


def test_wheel_holds_migrations_and_broker_config(wheel: Path) -> None:
    """The wheel ships gateway/_data/migrations/*.sql and gateway/_data/mosquitto/mosquitto.conf."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "gateway/_data/migrations/001_schema.sql" in names
        assert "gateway/_data/mosquitto/mosquitto.conf" in names
        for sql in sorted((PROJECT_ROOT / "migrations").glob("*.sql")):
            packed = zf.read(f"gateway/_data/migrations/{sql.name}")
            assert packed == sql.read_bytes(), sql.name
        conf = zf.read("gateway/_data/mosquitto/mosquitto.conf")
        assert conf == (PROJECT_ROOT / "mosquitto" / "mosquitto.conf").read_bytes()
        assert "gateway/cli.py" in names
        assert "gateway/__init__.py" in names
        assert not any(n.startswith("tests/") for n in names)
        leaked = [n for n in names if n == "gateway/_data/mosquitto/passwd"]
        leaked += [n for n in names if "/certs/" in n]
        assert leaked == [], f"broker secrets in the wheel: {leaked}"


def test_wheel_has_the_gateway_console_script(wheel: Path) -> None:
    """The wheel's entry points declare the ``gateway`` console script -> gateway.cli:main."""
    with zipfile.ZipFile(wheel) as zf:
        entry_points = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert len(entry_points) == 1, zf.namelist()
        parser = configparser.ConfigParser()
        parser.read_string(zf.read(entry_points[0]).decode())
    assert parser.has_section("console_scripts")
    assert parser.get("console_scripts", "gateway").strip() == "gateway.cli:main"


async def test_unpacked_wheel_finds_its_data(wheel: Path, tmp_path: Path) -> None:
    """The packaged gateway finds its migrations and broker config inside the package."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    code = (
        "import gateway.resources as r, gateway.store.migrate as m;"
        "print(r.data_dir('migrations'));"
        "print(r.data_dir('mosquitto'));"
        "print([x.version for x in m.load_migrations()])"
    )
    env = clean_env(PYTHONPATH=str(tmp_path))
    done = await run_process([sys.executable, "-c", code], env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done
    migrations, mosquitto, versions = done.stdout.splitlines()
    assert Path(migrations) == tmp_path / "gateway" / "_data" / "migrations"
    assert Path(mosquitto) == tmp_path / "gateway" / "_data" / "mosquitto"
    assert versions.startswith("[1")
