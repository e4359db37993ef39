"""Throwaway PostgreSQL and Mosquitto servers as child processes on loopback.

Used by ``gateway dev`` (the embedded default of SPEC §6), by the test fixtures and by the
benchmarks. PostgreSQL refuses to run as root, so as root it runs as an unprivileged user
(``postgres`` when it exists, else ``nobody``); it is stopped with SIGINT (fast shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gateway.resources import data_dir

log = logging.getLogger(__name__)

PG_INSTALL_HINT = (
    "PostgreSQL 15+ server binaries (initdb, postgres) were not found on PATH or in "
    "/usr/lib/postgresql/*/bin. Install them with: sudo apt-get install postgresql"
)
MOSQUITTO_INSTALL_HINT = (
    "mosquitto was not found on PATH or in /usr/sbin. "
    "Install it with: sudo apt-get install mosquitto mosquitto-clients"
)


class DevStackError(RuntimeError):
    """A local server could not be found or started; the message says what to do."""


def _which(name: str, extra: list[Path]) -> Path | None:
    found = shutil.which(name)
    if found:
        return Path(found)
    for folder in extra:
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def postgres_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``postgres`` (newest version first)."""
    roots = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for folder in roots:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).parent / "postgres").is_file():
        return Path(initdb).parent
    raise DevStackError(PG_INSTALL_HINT)


def mosquitto_binary() -> Path:
    found = _which("mosquitto", [Path("/usr/sbin"), Path("/usr/local/sbin")])
    if found is None:
        raise DevStackError(MOSQUITTO_INSTALL_HINT)
    return found


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    # mosquitto 2.0.11 binds its WebSocket listener on all interfaces
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


_LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 (/proc/net)


def _listeners() -> list[tuple[str, int, str]] | None:
    """(address in hex, port, socket inode) of every listening TCP socket (Linux /proc/net),
    None when the tables cannot be read."""
    found: list[tuple[str, int, str]] = []
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        readable = True
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                address, _, hex_port = fields[1].partition(":")
                found.append((address, int(hex_port, 16), fields[9]))
    return found if readable else None


def listens_beyond_loopback(port: int) -> bool:
    """Does some socket listen on ``port`` on an address other than loopback (Linux)?"""
    return any(p == port and address not in _LOOPBACK_HEX for address, p, _ in _listeners() or ())


def free_port(preferred: int | None = None) -> int:
    """``preferred`` if it is free, else a free port the kernel picks."""
    if preferred and port_free(preferred):
        return preferred
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port_free(port):
            return port
    raise DevStackError("no free TCP port found on 127.0.0.1")


def _socket_inodes(pid: int) -> set[str] | None:
    """Inodes of the sockets process ``pid`` holds (Linux), None when that cannot be read."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    inodes = set()
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def listens_on(pid: int, port: int) -> bool | None:
    """Does process ``pid`` itself listen on ``port``? None when the system does not say."""
    mine, listening = _socket_inodes(pid), _listeners()
    if mine is None or listening is None:
        return None
    return any(p == port and inode in mine for _, p, inode in listening)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Wait until ``proc`` listens on ``port``. Something else answering there (another
    `gateway dev` that took the port a moment after we found it free) does not count."""
    deadline = time.monotonic() + timeout
    taken = False
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            held = " (another process holds that port)" if taken or not port_free(port) else ""
            raise DevStackError(
                f"{what} exited with code {proc.returncode} while starting on "
                f"127.0.0.1:{port}{held}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                if listens_on(proc.pid, port) is not False:
                    return
                taken = True
        time.sleep(0.02)
    held = ": another process holds that port" if taken else ""
    raise DevStackError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s{held}")


def _service_user() -> str | None:
    """The user to run PostgreSQL as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise DevStackError("running as root and no unprivileged user (postgres, nobody) exists")


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster in ``base_dir``; ``dsn(db)`` to connect (trust auth)."""

    base_dir: Path
    port: int = 0
    user: str = "hydrobit"
    fsync: bool = False
    _proc: subprocess.Popen[bytes] | None = None
    _data: Path | None = None
    _cleanup: Path | None = None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        bindir = postgres_bin_dir()
        run_as = _service_user()
        self.port = self.port or free_port()
        self.base_dir.mkdir(parents=True, exist_ok=True)
        data = self._data_dir(run_as)
        log_file = self.base_dir / "postgres.log"
        if not (data / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "--no-sync",
                    "-A",
                    "trust",
                    "-U",
                    self.user,
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "-D",
                    str(data),
                ],
                user=run_as,
                capture_output=True,
                check=False,
                cwd="/",
            )
            if result.returncode != 0:
                raise DevStackError(f"initdb failed: {result.stderr.decode(errors='replace')}")
        settings = [
            "listen_addresses=127.0.0.1",
            f"port={self.port}",
            "unix_socket_directories=",
            "max_connections=300",
            f"fsync={'on' if self.fsync else 'off'}",
            "shared_buffers=256MB",
            "log_min_messages=warning",
        ]
        args = [str(bindir / "postgres"), "-D", str(data)]
        for s in settings:
            args += ["-c", s]
        with open(log_file, "ab") as out:
            self._proc = subprocess.Popen(
                args,
                user=run_as,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd="/",
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, self._proc, "PostgreSQL")
            self._wait_accepting()
        except DevStackError as exc:
            self.stop()
            tail = log_file.read_text(errors="replace")[-2000:]
            raise DevStackError(f"{exc}\n--- postgres.log ---\n{tail}") from None
        return self

    def _data_dir(self, run_as: str | None) -> Path:
        """The cluster folder; for another user it lives where that user can reach it."""
        if self._data is not None:
            return self._data
        if run_as is None:
            data = self.base_dir / "pgdata"
            data.mkdir(mode=0o700, exist_ok=True)
        else:
            # base_dir may sit under a root-only folder (pytest's tmp, /root): use /tmp
            holder = Path(tempfile.mkdtemp(prefix="hydrobit-pg-"))
            holder.chmod(0o711)
            data = holder / "pgdata"
            data.mkdir(mode=0o700)
            entry = pwd.getpwnam(run_as)
            os.chown(data, entry.pw_uid, entry.pw_gid)
            self._cleanup = holder
        self._data = data
        return data

    @property
    def data_dir(self) -> Path | None:
        """Where the cluster's files are (outside ``base_dir`` when run as another user)."""
        return self._data

    def remove(self) -> None:
        """Stop and delete the cluster's files."""
        self.stop()
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)
            self._cleanup = None
            self._data = None

    def _wait_accepting(self, timeout: float = 30) -> None:
        """The port opens before the database accepts logins; wait for a real query."""
        psql = shutil.which("psql") or str(postgres_bin_dir() / "psql")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                [psql, self.dsn(), "-tAc", "SELECT 1"], capture_output=True, check=False
            )
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise DevStackError("PostgreSQL did not accept connections in time")

    def create_database(self, name: str) -> str:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        psql = shutil.which("psql") or str(postgres_bin_dir() / "psql")
        subprocess.run(
            [psql, self.dsn(), "-qtAc", f"CREATE DATABASE {name}"],
            capture_output=True,
            check=True,
        )
        return self.dsn(name)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid, also its process group's (its backends are in it)."""
        return self._proc.pid if self._proc is not None else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, sig)
            self._proc.wait(30)

    def stop(self) -> None:
        """Fast shutdown (SIGINT): active sessions are cut, nothing waits for clients."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()


# options that belong to the listener above them (dropped with a listener that is not used)
_LISTENER_OPTIONS = frozenset(
    {
        "protocol",
        "certfile",
        "keyfile",
        "cafile",
        "capath",
        "crlfile",
        "ciphers",
        "ciphers_tls1.3",
        "dhparamfile",
        "require_certificate",
        "tls_version",
        "tls_engine",
        "tls_keyform",
        "use_identity_as_username",
        "use_subject_as_username",
        "use_username_as_clientid",
        "http_dir",
        "socket_domain",
        "bind_interface",
        "max_connections",
        "mount_point",
        "psk_hint",
    }
)


def render_mosquitto_config(
    source: Path,
    *,
    tcp_port: int,
    ws_port: int,
    state_dir: Path,
    as_root: bool,
    tls_port: int | None = None,
    wss_port: int | None = None,
    certs_dir: Path | None = None,
    password_file: Path | None = None,
) -> str:
    """The project's broker config with loopback ports and private paths substituted.

    Listeners 1883 and 9001 move to ``tcp_port`` and ``ws_port``; the TLS listeners 8883 (mqtts)
    and 9443 (wss) move to ``tls_port`` and ``wss_port`` when these and ``certs_dir`` are given,
    with their certfile, keyfile and cafile taken from ``certs_dir`` (same file names). Any other
    listener is commented out together with its listener options. ``password_file`` replaces the
    config's password file.
    """
    ports = {"1883": tcp_port, "9001": ws_port}
    if tls_port and certs_dir is not None:
        ports["8883"] = tls_port
    if wss_port and certs_dir is not None:
        ports["9443"] = wss_port
    out: list[str] = []
    in_dropped_listener = False
    password_written = False
    for line in source.read_text().splitlines():
        words = line.split()
        key = words[0] if words and not words[0].startswith("#") else ""
        if key == "listener":
            in_dropped_listener = not (len(words) >= 2 and words[1] in ports)
        if key == "listener" and not in_dropped_listener:
            out.append(f"listener {ports[words[1]]} 127.0.0.1")
        elif key == "listener" or (in_dropped_listener and key in _LISTENER_OPTIONS):
            out.append(f"# (not used here) {line}")
        elif key == "persistence_location":
            out.append(f"persistence_location {state_dir}/")
        elif key in ("pid_file", "log_dest", "include_dir", "user"):
            continue
        elif key == "password_file" and password_file is not None:
            if not password_written:
                out.append(f"password_file {password_file}")
                password_written = True
        elif key in ("password_file", "acl_file") and len(words) >= 2:
            path = Path(words[1])
            if not path.is_absolute():
                path = source.parent / path
            out.append(f"{key} {path}")
        elif key in ("certfile", "keyfile", "cafile") and certs_dir is not None and len(words) >= 2:
            out.append(f"{key} {certs_dir / Path(words[1]).name}")
        elif key in ("certfile", "keyfile", "cafile"):
            out.append(f"# (not used here) {line}")
        else:
            out.append(line)
    if password_file is not None and not password_written:
        out.append(f"password_file {password_file}")
    out.append("log_dest stderr")
    if as_root:
        out.append("user root")
    return "\n".join(out) + "\n"


@dataclass
class MosquittoServer:
    """A private broker from the project's configuration, on loopback ports.

    With ``certs_dir`` (holding the certfile/keyfile/cafile names the config uses) the config's
    TLS listeners 8883 and 9443 run too, on ``tls_port`` and ``wss_port`` (free ones when 0);
    ``password_file`` replaces the config's password file.
    """

    base_dir: Path
    tcp_port: int = 0
    ws_port: int = 0
    config_name: str = "mosquitto.conf"
    certs_dir: Path | None = None
    tls_port: int = 0
    wss_port: int = 0
    password_file: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.tcp_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.ws_port}/mqtt"

    @property
    def tls_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.tls_port}"

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.wss_port}/mqtt"

    def start(self) -> MosquittoServer:
        binary = mosquitto_binary()
        self.tcp_port = self.tcp_port or free_port()
        self.ws_port = self.ws_port or free_port()
        if self.certs_dir is not None:
            self.tls_port = self.tls_port or free_port()
            self.wss_port = self.wss_port or free_port()
        state = self.base_dir / "mosquitto"
        state.mkdir(parents=True, exist_ok=True)
        conf = state / "mosquitto.conf"
        text = render_mosquitto_config(
            data_dir("mosquitto") / self.config_name,
            tcp_port=self.tcp_port,
            ws_port=self.ws_port,
            state_dir=state,
            as_root=os.geteuid() == 0,
            tls_port=self.tls_port or None,
            wss_port=self.wss_port or None,
            certs_dir=self.certs_dir,
            password_file=self.password_file,
        )
        conf.write_text(text)
        listening = [line.split()[1] for line in text.splitlines() if line.startswith("listener ")]
        log_file = state / "mosquitto.log"
        with open(log_file, "ab") as out:
            self._proc = subprocess.Popen(
                [str(binary), "-c", str(conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.tcp_port, self._proc, "mosquitto")
            wait_for_port(self.ws_port, self._proc, "mosquitto (websockets)")
            for port, what in ((self.tls_port, "mqtts"), (self.wss_port, "wss")):
                if port and str(port) in listening:
                    wait_for_port(port, self._proc, f"mosquitto ({what})")
        except DevStackError as exc:
            self.stop()
            tail = log_file.read_text(errors="replace")[-2000:]
            raise DevStackError(f"{exc}\n--- mosquitto.log ---\n{tail}") from None
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)
            self._proc.wait(30)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()
