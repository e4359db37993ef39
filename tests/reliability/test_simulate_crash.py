"""``gateway simulate`` while the gateway is SIGKILLed and restarted under it: the simulated
fleet still gets every answer, and the ledger holds each record once."""

from __future__ import annotations

import asyncio
import re
import sys

from tests.reliability.conftest import PrivateStack
from tests.reliability.test_faults import ledger, open_session
from tests.support.extra_helpers import PROJECT_ROOT, clean_env

RECORDS = 3000
SUMMARY = re.compile(r"(?P<replies>\d+)/(?P<sent>\d+) answered in ")


async def test_simulated_fleet_survives_a_gateway_crash(stack: PrivateStack) -> None:
    gateway = stack.gateway("sim").start()
    await gateway.wait_ready()
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    fleet = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "simulate",
        "--url",
        f"ws://127.0.0.1:{stack.broker.ws_port}/mqtt",
        "--token",
        tenant.token(),
        "--session",
        sid,
        "--devices",
        "4",
        "--records",
        str(RECORDS),
        "--rate",
        "600",
        env=clean_env(GATEWAY_TOPIC_PREFIX=stack.prefix),
        cwd=str(PROJECT_ROOT),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(600):  # until a sixth of the run is stored (at most a minute)
            if (await ledger(stack.dsn, sid))["stored"] >= RECORDS // 6:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the simulated fleet stored too little before the crash")
        gateway.kill()  # mid-run: batches in hand die with it, unacknowledged
        at_crash = (await ledger(stack.dsn, sid))["stored"]
        assert at_crash < RECORDS  # the crash did land in the middle of the run
        await asyncio.sleep(1)  # the fleet keeps publishing; the broker queues for the gateway
        restarted = stack.gateway("sim").start()
        await restarted.wait_ready()
        stdout, stderr = await asyncio.wait_for(fleet.communicate(), 180)
    finally:
        if fleet.returncode is None:
            fleet.kill()
            await fleet.wait()
    out = stdout.decode()
    assert fleet.returncode == 0, out + stderr.decode()[-2000:]
    summary = SUMMARY.search(out)
    assert summary, out
    assert summary["replies"] == summary["sent"] == str(RECORDS)
    got = await ledger(stack.dsn, sid)
    assert got["stored"] == got["distinct_keys"] == got["total_records"] == RECORDS
    assert got["units"] == got["total_units"]
