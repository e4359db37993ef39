"""The gateway as a real process (``gateway run``), for tests that kill or restart it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from gateway.devstack import free_port
from tests.support.tenants import JWT_SECRET


class GatewayProcess:
    """``python -m gateway.cli run`` with GATEWAY_* from ``env``; output goes to ``log_path``."""

    def __init__(self, log_path: Path, **settings: Any) -> None:
        self.http_port = int(settings.pop("http_port", 0)) or free_port()
        self.env = {
            **os.environ,
            "GATEWAY_JWT_SECRET": JWT_SECRET,
            "GATEWAY_HTTP_PORT": str(self.http_port),
            "GATEWAY_LOG_FORMAT": "text",
            **{f"GATEWAY_{k.upper()}": str(v) for k, v in settings.items()},
        }
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    async def wait_ready(self, timeout: float = 30) -> None:
        """Until /readyz answers 200 (database and broker connected)."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        async with aiohttp.ClientSession() as http:
            for _ in range(int(timeout / 0.1)):
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-3000:]}")
                try:
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise RuntimeError(f"gateway not ready in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no goodbye, no drain."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    async def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait (bounded) for a graceful exit; returns the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(int(timeout / 0.05)):
            code = self.proc.poll()
            if code is not None:
                return code
            await asyncio.sleep(0.05)
        self.proc.kill()
        raise RuntimeError("gateway did not stop after SIGTERM")

    def close(self) -> None:
        self.kill()
