"""Soak variants (``make soak``): longer and harsher than the suite's; not run by ``make test``."""

from __future__ import annotations

import asyncio

import pytest

from tests.reliability.conftest import PrivateStack
from tests.reliability.test_faults import assert_exactly_once, open_session
from tests.support.stream import RecordStream

pytestmark = pytest.mark.soak


async def test_repeated_sigkills_over_a_long_stream(stack: PrivateStack) -> None:
    """20,000 records while the gateway is SIGKILLed and restarted five times: all once."""
    gateway = stack.gateway("soak").start()
    await gateway.wait_ready()
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    stream = RecordStream(
        "127.0.0.1", stack.broker.ws_port, stack.prefix, tenant.token(ttl_s=7200), sid, 20_000
    )
    await stream.connect()
    try:
        for round_ in range(5):
            await stream.send(round_ * 4000, (round_ + 1) * 4000)
            await stream.wait_for_replies(round_ * 4000 + 1000, timeout=120)
            gateway.kill()
            await asyncio.sleep(0.5)
            gateway = stack.gateway("soak").start()
            await gateway.wait_ready()
        await stream.settle(timeout=300)
    finally:
        await stream.close()
    await assert_exactly_once(stack, stream)
