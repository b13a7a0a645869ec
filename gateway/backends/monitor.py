"""One probe task per backend: every ``probe_interval_s``, GET the health path and, when healthy,
scrape the metrics path (and the flavor's info path until it has answered), then report what it
saw. A thin I/O edge: decisions stay in ``gateway.core``; errors become ``Health`` values.

A refused connection means LOADING: a backend the policy names is expected to come up (vLLM does
not listen until its engine is ready). A timeout or an unexpected status is FAILED.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import aiohttp

from gateway.backends.flavors import MetricMap, metric_map
from gateway.backends.parse import (
    MetricsFormatError,
    parse_health,
    parse_metrics,
    parse_props,
    parse_tgi_info,
)
from gateway.core.backend import BackendConfig, BackendSignals
from gateway.core.clock import Clock
from gateway.core.lifecycle import Health

log = logging.getLogger("kvgate.monitor")

HealthSink = Callable[[Health], None]
SignalSink = Callable[[BackendSignals], None]


class BackendMonitor:
    """Probes one backend until ``stop``; reports through the two sinks (synchronous calls)."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        session: aiohttp.ClientSession,
        clock: Clock,
        on_health: HealthSink,
        on_signals: SignalSink,
    ) -> None:
        self.config = config
        self._session = session
        self._clock = clock
        self._on_health = on_health
        self._on_signals = on_signals
        self._names: MetricMap = metric_map(config.signals, config.metric_names)
        self._info: tuple[int | None, int | None, int | None] | None = None
        self._task: asyncio.Task[None] | None = None
        interval = config.probe_interval_s
        self._timeout = aiohttp.ClientTimeout(total=max(1.0, min(5.0, 2 * interval)))
        self._headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"kvgate-probe {self.config.url}")

    def cancel(self) -> None:
        """Stop probing without waiting for the task to finish (a reload dropped it)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def probe_once(self) -> Health:
        """One health probe and, if healthy, one scrape; reports both. Returns the health."""
        health = await self._health()
        self._on_health(health)
        if health is Health.OK:
            signals = await self._scrape()
            if signals is not None:
                self._on_signals(signals)
        else:
            self._info = None  # a reload may change slots or pool size: ask again
        return health

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not end the probing of this backend
                log.exception("probe of %s failed", self.config.url)
            await asyncio.sleep(self.config.probe_interval_s)

    async def _get(self, path: str) -> tuple[int, bytes]:
        url = self.config.url.rstrip("/") + path
        async with self._session.get(url, headers=self._headers, timeout=self._timeout) as resp:
            return resp.status, await resp.read()

    async def _health(self) -> Health:
        try:
            status, body = await self._get(self.config.health_path)
        except aiohttp.ClientConnectorError:
            return Health.LOADING
        except (aiohttp.ClientError, TimeoutError):
            return Health.FAILED
        return parse_health(status, body)

    async def _scrape(self) -> BackendSignals | None:
        names = self._names
        if not names.scrape:
            return None
        if names.info_path is not None and self._info is None:
            self._info = await self._fetch_info(names.info_path)
        signals = await self._metrics()
        if self._info is None:
            return signals
        slots, slot_ctx, pool_tokens = self._info
        # llama.cpp without --metrics still tells its slots: report them alone
        base = signals or BackendSignals(at=self._clock.now())
        return dataclasses.replace(
            base,
            capacity_tokens=base.capacity_tokens or pool_tokens,
            total_slots=slots,
            slot_ctx_tokens=slot_ctx,
        )

    async def _metrics(self) -> BackendSignals | None:
        try:
            status, body = await self._get(self.config.metrics_path)
        except (aiohttp.ClientError, TimeoutError):
            return None
        if status != 200:
            return None
        try:
            return parse_metrics(
                body.decode("utf-8", "replace"),
                self._names,
                at=self._clock.now(),
                block_size=self.config.block_size,
            )
        except MetricsFormatError as exc:
            log.warning("unreadable metrics from %s: %s", self.config.url, exc)
            return None

    async def _fetch_info(self, path: str) -> tuple[int | None, int | None, int | None] | None:
        try:
            status, body = await self._get(path)
        except (aiohttp.ClientError, TimeoutError):
            return None
        if status != 200:
            return None
        if path == "/props":
            slots, ctx = parse_props(body)
            return slots, ctx, None
        return None, None, parse_tgi_info(body)
