"""Drives the pure engine in real time: simulated seconds = wall seconds since start x time_scale.

One task runs the steps. Each step is computed at its start, its failures (OOM, crash) are
delivered at once, and its tokens after sleeping until the step's end on the wall clock. Step
times are chained exactly (the next step starts where the last ended), so a late wake-up is
caught up by running the next steps without sleeping instead of being lost as idle time; if the
machine cannot keep up at all, ``lag_s`` grows and says so.
"""

from __future__ import annotations

import asyncio

from gateway.sim.config import SimConfig
from gateway.sim.engine import Engine, Failure, FinishReason, StepResult


class SeqChannel:
    """What a request handler sees of its sequence: tokens produced so far, then exactly one of
    ``finish_reason`` or ``failure``. ``changed`` is set whenever any of them changes."""

    __slots__ = ("changed", "failure", "finish_reason", "tokens")

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.tokens = 0
        self.finish_reason: FinishReason | None = None
        self.failure: Failure | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.failure is not None


class SimRuntime:
    """The engine, its wall clock and the channels of the requests in flight. Handlers call
    ``sync()`` before reading engine state so an idle engine's clock is current."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.engine = Engine(config)
        self._channels: dict[int, SeqChannel] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self.max_lag_s = 0.0
        # set whenever a load begins after the first (a restart, or a crash that reloads)
        self.reloading = asyncio.Event()

    def start(self) -> None:
        """Start the clock now (simulated time 0 is the moment the server starts loading)."""
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time()

    def sim_now(self) -> float:
        if self._loop is None:
            raise RuntimeError("the runtime has not been started")
        return (self._loop.time() - self._t0) * self.config.time_scale

    @property
    def lag_s(self) -> float:
        """How far the engine's clock is behind the wall clock (simulated seconds; 0 when the
        engine is ahead, i.e. sleeping through a step)."""
        return max(0.0, self.sim_now() - self.engine.now)

    def sync(self) -> Engine:
        """Bring an idle engine's clock to now (a busy one is paced by ``run``); return it."""
        if not self.engine.has_work():
            self.engine.advance_to(self.sim_now())
        return self.engine

    def submit(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        output_tokens: int | None,
        block_hashes: tuple[int, ...] | None = None,
    ) -> tuple[int, SeqChannel]:
        """Queue a request; raises what ``Engine.submit`` raises."""
        seq_id = self.sync().submit(prompt_tokens, max_tokens, output_tokens, block_hashes)
        channel = SeqChannel()
        self._channels[seq_id] = channel
        self._wake.set()
        return seq_id, channel

    def release(self, seq_id: int) -> None:
        """The handler is done with ``seq_id``; if it is still in flight (the client went away),
        cancel it so its blocks are freed."""
        if self._channels.pop(seq_id, None) is not None:
            self.engine.cancel(seq_id)

    def restart(self, load_time_s: float | None = None) -> float:
        """Restart the engine (see ``Engine.restart``); return wall seconds until it is ready."""
        self._fail(self.sync().restart(load_time_s))
        self.reloading.set()
        return (self.engine.ready_at - self.engine.now) / self.config.time_scale

    async def run(self) -> None:
        """The step loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        engine = self.engine
        while True:
            self.sync()
            if not engine.has_work():  # loading implies no work: submit refuses, restart clears
                self._wake.clear()
                await self._wake.wait()
                continue
            self.max_lag_s = max(self.max_lag_s, self.lag_s)
            result = engine.step()
            self._fail(result.failed)
            if engine.is_loading():  # the step crashed the engine
                self.reloading.set()
            end_wall = self._t0 + engine.now / self.config.time_scale
            # sleep(0) when behind: catch up but let handlers run between steps
            await asyncio.sleep(max(0.0, end_wall - loop.time()))
            self._deliver(result)

    def _deliver(self, result: StepResult) -> None:
        channels = self._channels
        for seq_id in result.tokens:
            channel = channels.get(seq_id)
            if channel is not None:
                channel.tokens += 1
                channel.changed.set()
        for seq_id, reason in result.finished:
            channel = channels.pop(seq_id, None)
            if channel is not None:
                channel.finish_reason = reason
                channel.changed.set()

    def _fail(self, failures: list[Failure]) -> None:
        for failure in failures:
            channel = self._channels.pop(failure.seq_id, None)
            if channel is not None:
                channel.failure = failure
                channel.changed.set()
