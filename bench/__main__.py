"""``make bench``: the whole stack on this machine, three responders under the same load.

    python -m bench [--records N] [--rate R] [--devices D] [--only gateway,echo,naive]
                    [--soak SECONDS] [--smoke] [--profile]

For each responder (the gateway; the echo ceiling on paho; the naive per-message baseline) it
starts a fresh process, warms it up, then drives the same fleet of simulated devices (MQTT 5
over WebSocket) through it, and prints records/s, reply latency p50/p99, CPU microseconds per
record of every process involved (responder, load generator, broker, database), peak RSS, the
ratios gateway/echo and gateway/naive, which process limits the figure, and, for the gateway,
whether the database holds exactly the records sent with totals equal to the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from gateway.core.auth import mint_token
from gateway.core.seedfile import SeedFile
from gateway.devstack import MosquittoServer, PostgresServer, free_port
from gateway.simulate import FleetPlan, FleetSummary, open_sessions, planned_requests, run_fleet
from gateway.store.migrate import migrate
from gateway.store.postgres import PostgresStore

PREFIX = "hydrobit/v2"
SECRET = "bench-secret-" + "0" * 40
TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent


def cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    return 0.0


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def tree_cpu(pid: int) -> dict[int, float]:
    return {p: cpu_seconds(p) for p in [pid, *children(pid)]}


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


@dataclass
class Run:
    responder: str
    records: int
    summary: dict[str, Any]
    cpu_us: dict[str, float]
    utilisation: dict[str, float]
    peak_rss_mib: float
    rss_samples_mib: list[float] = field(default_factory=list)
    exact: str = "n/a"
    batches: str = ""
    wal_bytes: int = 0  # WAL PostgreSQL wrote during the timed run

    @property
    def rate(self) -> float:
        return float(self.summary["rate"])

    def errors_or_unanswered(self) -> str:
        s = self.summary
        problems = []
        if s["errors"]:
            problems.append(f"{s['errors']} error replies")
        if s["replies"] < s["sent"]:
            problems.append(f"{s['sent'] - s['replies']} unanswered")
        return ", ".join(problems)


WAL_SEGMENTS = 48  # 768 MB of recycled 16 MB segments: a soak at 5,000/s writes ~4 MB/s
HISTORY_RECORDS = 1_000_000
HISTORY_PER_SESSION = 2_000


class Stack:
    """PostgreSQL and Mosquitto for the whole benchmark, and a tenant per responder."""

    def __init__(
        self, base: Path, *, fsync: bool, history: int, wal_segments: int = WAL_SEGMENTS
    ) -> None:
        self.pg = PostgresServer(base / "pg", fsync=fsync)
        self.history = history
        self.wal_segments = wal_segments
        self.broker = MosquittoServer(base / "mq")
        self.dsn = ""

    def __enter__(self) -> Stack:
        self.pg.start()
        self.dsn = self.pg.create_database("bench")
        asyncio.run(migrate(self.dsn))
        if self.history:  # a database in service, not a new one (see warm_wal, add_history)
            asyncio.run(warm_wal(self.dsn, self.wal_segments))
            asyncio.run(add_history(self.dsn, self.history))
        self.broker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.broker.stop()
        with contextlib.suppress(OSError):
            shutil.copy(self.pg.base_dir / "postgres.log", ROOT / "results" / "postgres.log")
        broker_log = self.broker.base_dir / "mosquitto" / "mosquitto.log"
        with contextlib.suppress(OSError):
            shutil.copy(broker_log, ROOT / "results" / "mosquitto.log")
        self.pg.remove()

    @property
    def postmaster(self) -> int:
        assert self.pg._proc is not None
        return self.pg._proc.pid

    @property
    def mosquitto(self) -> int:
        assert self.broker._proc is not None
        return self.broker._proc.pid

    def tenant(self, sectors: int) -> tuple[str, str, list[str]]:
        """(user, project, sector ids) of a fresh tenant."""
        tag = secrets.token_hex(4)
        seed = {
            "companies": [{"companyId": f"bench_{tag}", "name": "Bench Farms"}],
            "users": [{"auth0Id": f"bench_user_{tag}", "companyId": f"bench_{tag}"}],
            "projects": [
                {
                    "projectId": f"bench_proj_{tag}",
                    "companyId": f"bench_{tag}",
                    "name": "Bench",
                    "timezone": "UTC",
                    "pricePerUnit": 1.5,
                    "maxDurationHours": 24,
                    "sectors": [
                        {"sectorId": f"s{i:03d}", "sector_name": f"Sector {i}"}
                        for i in range(sectors)
                    ],
                }
            ],
        }

        async def apply() -> None:
            store = await PostgresStore.connect(self.dsn, max_size=1)
            try:
                await store.seed(SeedFile.model_validate(seed))
            finally:
                await store.close()

        asyncio.run(apply())
        return f"bench_user_{tag}", f"bench_proj_{tag}", [f"s{i:03d}" for i in range(sectors)]


async def warm_wal(dsn: str, segments: int = WAL_SEGMENTS) -> None:
    """Give the fresh cluster the recycled WAL segments a long-running server has.

    A new cluster has no WAL segment ahead of the one in use: whenever a commit crosses into
    the next 16 MB segment, its backend creates and zero-fills the file while holding the WAL
    write lock, and every other commit waits behind it (``WALInitWrite``): a 60-90 ms stall of
    all writers every ~4 s at 5,000 records/s on this VM's disk, the whole of the p99 reply
    latency. A server that has run a while reuses old segments instead (each checkpoint renames
    those it no longer needs into future ones, up to ``min_wal_size``). So: write ``segments``
    segments now, then checkpoint with ``min_wal_size`` big enough to keep them all.
    """
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"ALTER SYSTEM SET min_wal_size = '{segments * 16}MB'")
        await conn.execute(f"ALTER SYSTEM SET max_wal_size = '{max(1024, segments * 32)}MB'")
        await conn.execute("SELECT pg_reload_conf()")
        for _ in range(segments):
            await conn.execute("SELECT pg_current_xact_id()")  # some WAL, or no switch happens
            await conn.execute("SELECT pg_switch_wal()")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def add_history(dsn: str, records: int) -> None:
    """A ledger that has been in use: ``records`` records of closed sessions of another
    company, with their totals, then ``VACUUM ANALYZE``.

    On empty tables the first autovacuum ANALYZE of the ledger (~0.2 s of a core, sampling
    30,000 rows) falls inside the timed run and every later one follows after each 10 % of
    growth: artefacts of a new database, not of a gateway in service, whose ledger is large
    and whose statistics are current. It also runs the hot path's statements against indexes
    of a realistic depth.
    """
    if records <= 0:
        return
    sessions = max(1, records // HISTORY_PER_SESSION)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute(
                """
                INSERT INTO companies (company_id, name) VALUES ('bench_history', 'History Farms');
                INSERT INTO users (auth0_id, company_id)
                    VALUES ('bench_history_user', 'bench_history');
                INSERT INTO projects (project_id, company_id, name, timezone, price_per_unit)
                    VALUES ('bench_history_proj', 'bench_history', 'History', 'UTC', 1.5);
                """
            )
            await conn.execute(
                """
                INSERT INTO production_sessions (
                    session_id, company_id, project_id, owner_id, sector_id, sector_name,
                    timezone, day, status, close_reason, opened_at, closed_at,
                    max_duration_hours, expires_at, sampling_unit, price_per_unit)
                SELECT md5('h' || s)::text, 'bench_history', 'bench_history_proj',
                       'bench_history_user', 'h' || s, 'History ' || s, 'UTC',
                       (t - interval '400 days')::date + (s / 16), 'closed', 'closed',
                       t - interval '400 days' + (s / 16) * interval '1 day',
                       t - interval '400 days' + (s / 16) * interval '1 day' + interval '8 hours',
                       12, t - interval '400 days' + (s / 16) * interval '1 day'
                           + interval '12 hours', 'box', 1.5
                FROM generate_series(1, $1::int) s, (SELECT now() AS t) n
                """,
                sessions,
            )
            await conn.execute(
                """
                INSERT INTO production_records (
                    record_id, company_id, session_id, owner_id, worker_id, worker_name,
                    units, recorded_at, client_event_id, created_at)
                SELECT 'rec_' || substr(md5('r' || n), 1, 16), 'bench_history',
                       md5('h' || (1 + n % $2::int))::text, 'bench_history_user',
                       'W' || lpad((n % 50)::text, 3, '0'), 'Worker ' || (n % 50), 1,
                       now() - interval '400 days', 'hist-' || n, now() - interval '400 days'
                FROM generate_series(1, $1::int) n
                """,
                records,
                sessions,
            )
            await conn.execute(
                """
                INSERT INTO session_worker_totals (session_id, worker_id, units, records)
                SELECT session_id, worker_id, sum(units), count(*) FROM production_records
                WHERE company_id = 'bench_history' GROUP BY session_id, worker_id;
                UPDATE production_sessions s
                SET total_units = w.units, total_records = w.records, total_workers = w.workers
                FROM (SELECT session_id, sum(units) AS units, sum(records) AS records,
                             count(*) AS workers
                      FROM session_worker_totals GROUP BY session_id) w
                WHERE s.session_id = w.session_id AND s.company_id = 'bench_history';
                """
            )
        await conn.execute("VACUUM ANALYZE")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


@contextlib.contextmanager
def responder(name: str, stack: Stack, log_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    host, port = "127.0.0.1", str(stack.broker.tcp_port)
    if name == "gateway":
        http = free_port()
        env |= {
            "GATEWAY_DATABASE_URL": stack.dsn,
            "GATEWAY_MQTT_URL": stack.broker.url,
            "GATEWAY_MQTT_CLIENT_ID": f"bench-gateway-{secrets.token_hex(3)}",
            "GATEWAY_JWT_SECRET": SECRET,
            "GATEWAY_HTTP_PORT": str(http),
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
        cmd = [sys.executable, "-m", "gateway.cli", "run"]
    elif name == "echo":
        cmd = [sys.executable, "-m", "bench.echo", host, port, PREFIX]
    elif name == "fastecho":
        cmd = [sys.executable, "-m", "bench.fastecho", stack.broker.url, PREFIX]
    else:
        cmd = [sys.executable, "-m", "bench.naive", host, port, PREFIX, stack.dsn]
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, cwd=ROOT.parent)
    try:
        if name == "gateway":
            _HTTP_PORTS[proc.pid] = http
            _wait_http(http, proc)
        else:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if b"ready" not in line:
                raise RuntimeError(f"{name} did not start: see {log_dir / f'{name}.log'}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


_HTTP_PORTS: dict[int, int] = {}


def http_port_of(proc: subprocess.Popen[bytes]) -> int:
    return _HTTP_PORTS.get(proc.pid, 0)


def _batch_stats(port: int) -> str:
    """Average batch size and count, from the gateway's own /metrics."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return ""
    values = dict(
        line.split(" ", 1)
        for line in text.splitlines()
        if line.startswith(("gateway_batch_size_", "gateway_batch_apply_"))
    )
    count = float(values.get("gateway_batch_size_count", 0))
    total = float(values.get("gateway_batch_size_sum", 0))
    seconds = float(values.get("gateway_batch_apply_seconds_sum", 0))
    return (
        f"{count:.0f} batches, {total / max(count, 1):.0f} requests each on average, "
        f"{1000 * seconds / max(count, 1):.1f} ms each to apply (validate, commit, build replies)"
    )


def _wait_http(port: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError("the gateway exited during startup")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r,
        ):
            if r.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


def measure(name: str, stack: Stack, args: argparse.Namespace, log_dir: Path) -> Run:
    user, project, sectors = stack.tenant(args.devices)
    token = mint_token(SECRET, user, ttl_s=3 * 3600)
    with responder(name, stack, log_dir) as proc:
        ws = f"ws://127.0.0.1:{stack.broker.ws_port}/mqtt"
        if name == "gateway":
            sessions = open_sessions(ws, PREFIX, token, project, sectors)
        else:
            sessions = [secrets.token_hex(12) for _ in sectors]
        plan = FleetPlan(
            host="127.0.0.1",
            port=stack.broker.tcp_port if args.tcp else stack.broker.ws_port,
            path=None if args.tcp else "/mqtt",
            prefix=PREFIX,
            token=token,
            sessions=sessions,
            devices=args.devices,
            records=max(500, args.records // 20),
            rate=args.rate,
            window=args.window,
            processes=args.fleet_processes,
        )
        run_fleet(plan, show_progress=False)  # warm up: caches, connections, first-call paths
        # the naive baseline commits (and fsyncs) once per message: a smaller run says enough
        plan.records = min(args.records, args.naive_records) if name == "naive" else args.records
        plan.run_id = secrets.token_hex(3)
        pids = {"responder": proc.pid, "broker": stack.mosquitto}
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        pg_before = tree_cpu(stack.postmaster)
        wal_before = asyncio.run(wal_position(stack.dsn))
        samples: list[float] = []
        stop = False

        def sample() -> None:
            while not stop:
                samples.append(rss_kib(proc.pid) / 1024)
                time.sleep(args.rss_every)

        import threading

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        profiler = _start_profiler(proc.pid, log_dir, name) if args.profile else None
        summary = run_fleet(plan, show_progress=True)
        stop = True
        sampler.join(5)
        if profiler is not None:
            profiler.wait(60)
        after = {k: cpu_seconds(p) for k, p in pids.items()}
        pg_after = tree_cpu(stack.postmaster)
        wal_after = asyncio.run(wal_position(stack.dsn))
        cpu = {k: after[k] - before[k] for k in pids}
        cpu["database"] = sum(v - pg_before.get(p, 0.0) for p, v in pg_after.items())
        cpu["fleet"] = summary.fleet_cpu_s
        n = max(1, summary.replies)
        run = Run(
            responder=name,
            records=planned_requests(plan),
            summary=asdict(summary),
            cpu_us={k: 1e6 * v / n for k, v in cpu.items()},
            utilisation={k: v / max(summary.wall_s, 1e-9) for k, v in cpu.items()},
            peak_rss_mib=rss_kib(proc.pid, "VmHWM") / 1024,
            rss_samples_mib=samples,
            wal_bytes=wal_after - wal_before,
        )
        if name == "gateway":
            run.exact = asyncio.run(check_exact(stack.dsn, sessions, plan.run_id, summary))
            run.batches = _batch_stats(http_port_of(proc))
        return run


def _start_profiler(pid: int, log_dir: Path, name: str) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy not installed (pip install py-spy); no profile", file=sys.stderr)
        return None
    out = log_dir / f"{name}-profile.txt"
    return subprocess.Popen(
        [spy, "record", "-p", str(pid), "-d", "8", "-r", "250", "-f", "raw", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def wal_position(dsn: str) -> int:
    """PostgreSQL's current WAL position, in bytes."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


async def check_exact(dsn: str, sessions: list[str], run_id: str, summary: FleetSummary) -> str:
    """Stored records of this run == distinct records sent; totals == ledger for every session."""
    conn = await asyncpg.connect(dsn)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM production_records WHERE client_event_id LIKE $1",
            f"sim-{run_id}-%",
        )
        drift = await conn.fetchval(
            """SELECT count(*) FROM production_sessions s
               WHERE s.session_id = ANY($1::text[]) AND (s.total_units, s.total_records) <>
                     (SELECT coalesce(sum(units), 0), count(*) FILTER (WHERE kind = 'record')
                      FROM production_records r WHERE r.session_id = s.session_id)""",
            sessions,
        )
    finally:
        await conn.close()
    distinct = summary.sent - summary.idempotent
    ok = stored == distinct and drift == 0 and summary.errors == 0
    verdict = "EXACT" if ok else "MISMATCH"
    return f"{verdict}: {stored} stored / {distinct} distinct sent, {drift} sessions drifting"


def report(runs: list[Run], args: argparse.Namespace, speed_ms: float) -> str:
    lines = []
    head = (
        f"{'responder':<9} {'records/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'resp us/rec':>11} {'fleet':>6} {'broker':>6} {'db':>6} {'peak RSS':>9}"
    )
    lines += [head, "-" * len(head)]
    for r in runs:
        s = r.summary
        lines.append(
            f"{r.responder:<9} {s['rate']:>10,.0f} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} "
            f"{r.cpu_us['responder']:>11.1f} {r.cpu_us['fleet']:>6.1f} "
            f"{r.cpu_us['broker']:>6.1f} {r.cpu_us['database']:>6.1f} "
            f"{r.peak_rss_mib:>7.0f} MiB"
        )
    by = {r.responder: r for r in runs}
    lines.append("")
    for r in runs:
        busiest = max(r.utilisation, key=lambda k: r.utilisation[k])
        total = sum(r.utilisation.values())
        lines.append(
            f"{r.responder}: CPU in use {total:.2f} of {os.cpu_count()} cores "
            f"(responder {r.utilisation['responder']:.2f}, fleet {r.utilisation['fleet']:.2f}, "
            f"broker {r.utilisation['broker']:.2f}, database {r.utilisation['database']:.2f}); "
            f"busiest process: {busiest}"
        )
        if r.errors_or_unanswered():
            lines.append(f"  !! {r.errors_or_unanswered()}")
    if "gateway" in by:
        g = by["gateway"]
        lines.append(f"gateway exactness: {g.exact}")
        if g.batches:
            lines.append(f"gateway batches: {g.batches}")
        if g.wal_bytes:
            per = g.wal_bytes / max(1, g.summary["replies"])
            lines.append(
                f"gateway WAL: {g.wal_bytes / 2**20:,.1f} MiB written, {per:,.0f} bytes per record"
            )
        for other in ("echo", "naive"):
            if other in by:
                o = by[other]
                cpu_ratio = g.cpu_us["responder"] / max(1e-9, o.cpu_us["responder"])
                lines.append(
                    f"gateway/{other}: rate x{g.rate / max(1e-9, o.rate):.2f}, "
                    f"CPU per record x{cpu_ratio:.2f}"
                )
        if g.rss_samples_mib:
            lo, hi = min(g.rss_samples_mib), max(g.rss_samples_mib)
            lines.append(
                f"gateway RSS over the run: {g.rss_samples_mib[0]:.0f} -> "
                f"{g.rss_samples_mib[-1]:.0f} MiB (min {lo:.0f}, max {hi:.0f}, "
                f"spread {100 * (hi - lo) / max(lo, 1):.0f} %)"
            )
    mode = f"offered {args.rate:,.0f} records/s" if args.rate else "saturation"
    lines.insert(
        0,
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {mode}, {args.devices} devices, "
        f"{args.records} records per run; database: "
        + (
            f"in service ({args.history:,} records of history, recycled WAL)"
            if args.history
            else "new and empty"
        )
        + "\nhost speed: a fixed pure-Python loop takes "
        f"{speed_ms:.0f} ms here (lower is faster; CPU per record scales with it)\n",
    )
    return "\n".join(lines)


def host_speed_ms(rounds: int = 5) -> float:
    """Milliseconds this host takes for a fixed pure-Python loop (best of ``rounds``), taken
    before the stack starts: the same code's CPU per record moves with it from day to day
    (neighbours on the VM's host), so figures of different days compare through it."""
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.process_time() - started)
    return best * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--records", type=int, default=60_000, help="records per responder run (default 60,000)"
    )
    p.add_argument("--rate", type=float, default=0.0, help="offered records/s; 0 = saturate")
    p.add_argument("--devices", type=int, default=16, help="simulated devices, one session each")
    p.add_argument("--window", type=int, default=100, help="unanswered requests per device")
    p.add_argument(
        "--fleet-processes", type=int, default=1, help="load generator processes (devices split)"
    )
    p.add_argument(
        "--naive-records",
        type=int,
        default=2_000,
        help="records for the naive baseline (slow: ~650/s)",
    )
    p.add_argument("--tcp", action="store_true", help="devices on plain MQTT/TCP, not WebSocket")
    p.add_argument(
        "--only",
        default="gateway,echo,naive",
        help="responders to run, comma-separated: gateway, echo, naive, fastecho",
    )
    p.add_argument("--soak", type=float, default=0.0, help="seconds: a long gateway-only run")
    p.add_argument("--smoke", action="store_true", help="tiny run to check the bench works")
    p.add_argument("--profile", action="store_true", help="py-spy the responder (8 s)")
    p.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="PostgreSQL fsync, as in production (default on)",
    )
    p.add_argument(
        "--rss-every", type=float, default=1.0, help="seconds between RSS samples of the responder"
    )
    p.add_argument(
        "--history",
        type=int,
        default=HISTORY_RECORDS,
        help="records already in the ledger before the runs, and recycled WAL (a database in "
        "service); 0 = a new, empty database",
    )
    p.add_argument("--fresh-db", dest="history", action="store_const", const=0, help="--history 0")
    args = p.parse_args(argv)
    if args.smoke:
        args.records, args.devices, args.history = 600, 4, min(args.history, 4_000)
    if args.soak:
        args.only = "gateway"
        args.rate = args.rate or 5000.0
        args.records = int(args.soak * args.rate)
        args.rss_every = 10.0
    names = [n for n in args.only.split(",") if n]
    base = Path(tempfile.mkdtemp(prefix="hydrobit-bench-"))
    log_dir = ROOT / "results"
    log_dir.mkdir(exist_ok=True)
    runs = []
    speed = host_speed_ms()
    try:
        segments = 2 if args.smoke else WAL_SEGMENTS
        with Stack(base, fsync=args.fsync, history=args.history, wal_segments=segments) as stack:
            for name in names:
                print(f"--- {name} ---", file=sys.stderr)
                runs.append(measure(name, stack, args, log_dir))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    text = report(runs, args, speed)
    print(text)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    (log_dir / f"bench-{stamp}.json").write_text(
        json.dumps(
            {"args": vars(args), "host_speed_ms": speed, "runs": [asdict(r) for r in runs]},
            indent=2,
        )
    )
    (log_dir / f"bench-{stamp}.txt").write_text(text + "\n")
    bad = [r for r in runs if r.errors_or_unanswered()] or [
        r for r in runs if r.exact.startswith("MISMATCH")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
