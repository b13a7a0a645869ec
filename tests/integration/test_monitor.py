"""The probe monitor against real aiohttp stub backends on 127.0.0.1: health answers, metric
scrapes per flavor, llama.cpp's loading answers and slots, refused connections."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.backends.monitor import BackendMonitor
from gateway.core.backend import BackendConfig, BackendSignals, Signals
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health

pytestmark = pytest.mark.integration

ServerFactory = Callable[..., Awaitable[TestServer]]

VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0
# TYPE kvgate_gpu_fragmentation_ratio gauge
kvgate_gpu_fragmentation_ratio 0.2
"""

LOADING = {"error": {"message": "Loading model", "type": "unavailable_error"}}


@dataclass
class SignalStub:
    """A backend whose health, metrics and /props answers the test sets."""

    health_status: int = 200
    health_body: object = field(default_factory=lambda: {"status": "ok"})
    metrics: str = ""
    props: object = None
    auth_seen: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/props", self._props)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        self.auth_seen.append(request.headers.get("Authorization", ""))
        return web.json_response(self.health_body, status=self.health_status)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.health_status != 200:
            return web.json_response(self.health_body, status=self.health_status)
        return web.Response(text=self.metrics, content_type="text/plain")

    async def _props(self, request: web.Request) -> web.Response:
        if self.props is None:
            return web.Response(status=404)
        return web.json_response(self.props)


class Recorder:
    def __init__(self) -> None:
        self.health: list[Health] = []
        self.signals: list[BackendSignals] = []


async def monitor_for(
    url: str, session: aiohttp.ClientSession, **kw: object
) -> tuple[BackendMonitor, Recorder]:
    rec = Recorder()
    config = BackendConfig(url=url, probe_interval_s=0.02, **kw)  # type: ignore[arg-type]
    mon = BackendMonitor(
        config,
        session=session,
        clock=FakeClock(),
        on_health=rec.health.append,
        on_signals=rec.signals.append,
    )
    return mon, rec


async def test_vllm_health_and_scrape(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(metrics=VLLM_METRICS)
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(
            f"http://127.0.0.1:{server.port}", session, signals=Signals.VLLM, api_key="sk-b"
        )
        assert await mon.probe_once() is Health.OK
    [sig] = rec.signals
    assert sig.running == 3.0
    assert sig.kv_usage == 0.5
    assert sig.capacity_tokens == 1600
    assert sig.fragmentation == pytest.approx(0.2)
    assert stub.auth_seen == ["Bearer sk-b"]


async def test_503_is_loading_and_no_scrape(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(health_status=503, health_body={}, metrics=VLLM_METRICS)
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(f"http://127.0.0.1:{server.port}", session)
        assert await mon.probe_once() is Health.LOADING
    assert rec.signals == []


async def test_llamacpp_loading_then_slots(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(health_status=503, health_body=LOADING)
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(
            f"http://127.0.0.1:{server.port}", session, signals=Signals.LLAMACPP
        )
        assert await mon.probe_once() is Health.LOADING
        stub.health_status, stub.health_body = 200, {"status": "ok"}
        stub.props = {"total_slots": 4, "default_generation_settings": {"n_ctx": 4096}}
        stub.metrics = "llamacpp:requests_processing 1\nllamacpp:requests_deferred 0\n"
        assert await mon.probe_once() is Health.OK
    [sig] = rec.signals
    assert (sig.total_slots, sig.slot_ctx_tokens, sig.running) == (4, 4096, 1.0)


async def test_llamacpp_without_metrics_still_reports_slots(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(props={"total_slots": 2})
    app = stub.app()
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(
            f"http://127.0.0.1:{server.port}",
            session,
            signals=Signals.LLAMACPP,
            metrics_path="/nowhere",
        )
        await mon.probe_once()
    assert rec.signals[0].total_slots == 2


async def test_refused_connection_is_loading(aiohttp_server: ServerFactory) -> None:
    server = await aiohttp_server(SignalStub().app())
    port = server.port
    await server.close()
    async with aiohttp.ClientSession() as session:
        mon, _ = await monitor_for(f"http://127.0.0.1:{port}", session)
        assert await mon.probe_once() is Health.LOADING


async def test_unexpected_status_is_failed(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(health_status=500, health_body={"error": "boom"})
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, _ = await monitor_for(f"http://127.0.0.1:{server.port}", session)
        assert await mon.probe_once() is Health.FAILED


async def test_none_flavor_probes_health_only(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(metrics=VLLM_METRICS)
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(
            f"http://127.0.0.1:{server.port}", session, signals=Signals.NONE
        )
        assert await mon.probe_once() is Health.OK
    assert rec.signals == []


async def test_running_task_probes_until_stopped(aiohttp_server: ServerFactory) -> None:
    stub = SignalStub(metrics=VLLM_METRICS)
    server = await aiohttp_server(stub.app())
    async with aiohttp.ClientSession() as session:
        mon, rec = await monitor_for(f"http://127.0.0.1:{server.port}", session)
        mon.start()
        for _ in range(500):
            if len(rec.signals) >= 3:
                break
            await asyncio.sleep(0.01)
        await mon.stop()
    assert len(rec.signals) >= 3
    assert set(rec.health) == {Health.OK}
