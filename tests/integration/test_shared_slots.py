"""A slot backend (llama.cpp: a fixed number of sequences) shared by three gateway processes
through a real Redis (``admission.shared``): together they never hold more requests there than
it has slots, and they keep them busy."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.integration.conftest import until_ready
from tests.integration.test_cli import ROOT, _free_port

pytestmark = [pytest.mark.integration, pytest.mark.redis, pytest.mark.timeout(120)]

SLOTS = 3
HOLD_S = 0.3  # how long each request holds its slot
POLICY = """\
version: 1
server: {{port: {port}, admin: {{port: {admin_port}}}, anonymous_tenant: anon, access_log: false}}
store: {{kind: redis, url: "{redis_url}", prefix: {prefix}, replicas: 3}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 4096
    backends:
      - {{url: "{backend}", signals: llamacpp, warmup: 0s, probe_interval: 200ms}}
tenants:
  anon: {{limits: [{{unit: requests, rate: 10000/s}}]}}
admission:
  queue: {{max_wait: 30s}}
{shared}"""
SHARED = "  shared: {lease: 2s, refresh: 100ms, timeout: 200ms}\n"


class SlotBackend:
    """A llama.cpp-like server with ``SLOTS`` slots that counts the requests it runs at once
    (a real one would defer the extra ones inside itself, out of the gateway's order)."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.served = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/props", self._props)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _props(self, request: web.Request) -> web.Response:
        props = {"total_slots": SLOTS, "default_generation_settings": {"n_ctx": 4096}}
        return web.json_response(props)

    async def _metrics(self, request: web.Request) -> web.Response:
        deferred = max(0, self.running - SLOTS)
        return web.Response(
            text=f"llamacpp:requests_processing {min(self.running, SLOTS)}\n"
            f"llamacpp:requests_deferred {deferred}\n"
        )

    async def _chat(self, request: web.Request) -> web.Response:
        await request.read()
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(HOLD_S)
        finally:
            self.running -= 1
        self.served += 1
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "model": "m1",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
            }
        )


@contextlib.asynccontextmanager
async def _gateways(
    tmp_path: Path, redis_url: str, backend: str, *, shared: bool
) -> AsyncIterator[list[str]]:
    prefix = f"slots{uuid.uuid4().hex[:8]}"
    procs: list[asyncio.subprocess.Process] = []
    urls: list[str] = []
    try:
        for i in range(3):
            port = _free_port()
            text = POLICY.format(
                port=port,
                admin_port=_free_port(),
                redis_url=redis_url,
                prefix=prefix,
                backend=backend,
                shared=SHARED if shared else "",
            )
            path = tmp_path / f"gateway{i}.yaml"
            path.write_text(text)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-m", "gateway", "run", "-c", str(path), "--workers", "1"),
                    env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)},
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as session:
            for url in urls:
                await until_ready(session, url)
        yield urls
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 20)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _drive(urls: list[str], clients: int, seconds: float) -> dict[int, int]:
    """Closed-loop clients round robin over the gateways; answers by status."""
    statuses: dict[int, int] = {}
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40)) as session:

        async def client(k: int) -> None:
            while time.monotonic() < end:
                k += 1
                async with session.post(f"{urls[k % 3]}/v1/chat/completions", json=body) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1

        await asyncio.gather(*(client(k) for k in range(clients)))
    return statuses


ServerFactory = Callable[..., Awaitable[TestServer]]


async def test_three_gateways_never_hold_more_than_the_backends_slots(
    tmp_path: Path, redis_url: str, aiohttp_server: ServerFactory
) -> None:
    backend = SlotBackend()
    server = await aiohttp_server(backend.app())
    url = f"http://127.0.0.1:{server.port}"
    async with _gateways(tmp_path, redis_url, url, shared=True) as gateways:
        statuses = await _drive(gateways, clients=4 * SLOTS, seconds=6.0)
    assert set(statuses) == {200}, statuses
    assert backend.most == SLOTS  # full, never over
    # kept busy: at least 80% of what the slots serve back to back in the run
    assert backend.served >= 0.8 * SLOTS * 6.0 / HOLD_S, backend.served
