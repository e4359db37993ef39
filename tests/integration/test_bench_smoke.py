"""The benchmark still runs end to end (a tiny run; figures are not checked, only that it works
and that the gateway's run was exact)."""

from __future__ import annotations

import asyncio
import sys


async def test_bench_smoke_run_reports_every_responder() -> None:
    """python -m bench --smoke exits 0, prints a row per responder and an exact gateway run."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    assert proc.returncode == 0, err.decode()[-2000:]
    for name in ("gateway", "echo", "naive"):
        assert any(line.startswith(name) for line in text.splitlines()), text
    assert "gateway exactness: EXACT" in text
    assert "gateway/echo: rate x" in text
