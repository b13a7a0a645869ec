"""The async driver of admission: what the proxy awaits before forwarding a request.

``Admitter`` owns the pure ``gateway.core.admission.Admission`` and turns its decisions into
awaitables: a queued request waits on a future that a later pump resolves (a release, a probe,
or the timer set to the core's ``next_wakeup``: deadlines, ageing, warm-up steps, CoDel). It also
runs one ``BackendMonitor`` per backend. Everything runs on one event loop; no locks needed.

Cancellation: when the task awaiting ``acquire`` is cancelled (the client left), its entry leaves
the queue; if a placement raced the cancellation, it is released at once. Nothing leaks.

With a ``SharedLink`` (``admission.shared``), every placement on a backend counted in bytes or
slots is confirmed in Redis before ``acquire`` returns; a refused one (other replicas filled the
backend first) is offered again with the foreign figure Redis answered. Releases and a heartbeat
every ``refresh_s`` publish this replica's figure per backend and refresh the other replicas'.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import aiohttp

from gateway.backends.monitor import BackendMonitor
from gateway.backends.shared import SharedLink
from gateway.core.admission import Admission, Placement, Queued, Rejection
from gateway.core.backend import BackendConfig, BackendSignals, Failure
from gateway.core.clock import Clock
from gateway.core.lifecycle import Health
from gateway.core.pool import AdmissionConfig, Ticket
from gateway.core.types import Outcome

_WAITING_BEATS = 10  # heartbeats per refresh interval of a backend with requests waiting


class Shed(Exception):
    """Admission refused the request: a decision, carried as an exception to the handler."""

    def __init__(
        self,
        outcome: Outcome,
        retry_after_s: float | None,
        message: str,
        should_retry: bool = True,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.retry_after_s = retry_after_s
        self.message = message
        self.should_retry = should_retry

    @classmethod
    def of(cls, rejection: Rejection) -> Shed:
        return cls(
            rejection.outcome, rejection.retry_after_s, rejection.message, rejection.should_retry
        )


class Lease:
    """A placement on one backend. ``release`` must be called once the upstream exchange is
    over; further calls do nothing."""

    __slots__ = (
        "_admitter",
        "_released",
        "backend_url",
        "lease_id",
        "model",
        "queued_s",
        "reserved_bytes",
    )

    def __init__(self, admitter: Admitter, placement: Placement) -> None:
        self._admitter = admitter
        self._released = False
        self.lease_id = placement.lease_id
        self.backend_url = placement.backend_url
        self.model = placement.model
        self.reserved_bytes = placement.reserved_bytes
        self.queued_s = placement.queued_s

    def discard(self) -> None:
        """Forget the lease without releasing it (the core already took it back)."""
        self._released = True

    def started(self) -> None:
        """The backend's response began: what it allocates for the request is allocated."""
        if not self._released:
            self._admitter._mark_started(self.lease_id)

    def first_token(self) -> None:
        """The answer's first token was relayed to the client."""
        if not self._released:
            self._admitter._first_token(self.lease_id)

    def release(
        self,
        *,
        output_tokens: int | None = None,
        ttft_s: float | None = None,
        failure: Failure | None = None,
    ) -> None:
        """Free the reservation; feed output length, TTFT and failures back; wake the queue."""
        if self._released:
            return
        self._released = True
        self._admitter._release(self.lease_id, output_tokens, ttft_s, failure)


class Admitter:
    """One per gateway; knows every model's backends. See the module docstring."""

    def __init__(
        self,
        config: AdmissionConfig,
        clock: Clock,
        *,
        session: aiohttp.ClientSession | None = None,
        shared: SharedLink | None = None,
        share: float = 1.0,
    ) -> None:
        self._clock = clock
        self._core = Admission(config, clock.now())
        self._base_share = share  # this process's share when nothing is shared (workers)
        self._core.set_share(share, clock.now())
        self._shared = shared
        if shared is not None:
            shared.listen(self._on_shared_switch)
        self._heartbeat: asyncio.Task[None] | None = None
        self._publish: asyncio.Task[None] | None = None
        self._dirty: set[str] = set()
        self._waiters: dict[int, asyncio.Future[Placement | Rejection]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._monitors: dict[tuple[str, str], BackendMonitor] = {}
        self._session = session
        self._own_session = session is None
        self._started = False

    async def acquire(self, ticket: Ticket) -> Lease:
        """Wait for room on a backend; raise ``Shed`` when admission refuses."""
        while True:
            lease = await self._admit(ticket)
            if self._shared is None or await self._confirm(self._shared, lease, ticket):
                return lease

    async def _admit(self, ticket: Ticket) -> Lease:
        verdict = self._core.offer(ticket, self._clock.now())
        self._dispatch()
        if isinstance(verdict, Placement):
            return Lease(self, verdict)
        if isinstance(verdict, Rejection):
            raise Shed.of(verdict)
        return await self._wait(verdict)

    async def _wait(self, queued: Queued) -> Lease:
        fut: asyncio.Future[Placement | Rejection] = asyncio.get_running_loop().create_future()
        self._waiters[queued.entry_id] = fut
        self._reschedule()
        try:
            result = await fut
        except asyncio.CancelledError:
            self._waiters.pop(queued.entry_id, None)
            self._core.cancel(queued.entry_id)
            raced = fut.result() if fut.done() and not fut.cancelled() else None
            if isinstance(raced, Placement):
                self._release(raced.lease_id, None, None, None)
            else:
                self._dispatch()
            raise
        if isinstance(result, Rejection):
            raise Shed.of(result)
        return Lease(self, result)

    async def _confirm(self, shared: SharedLink, lease: Lease, ticket: Ticket) -> bool:
        """Record the placement in the shared store; False when it was refused there (the
        lease is then gone and the request is to be offered again)."""
        url = lease.backend_url
        limit = self._core.ceiling(lease.model, url, self._clock.now())
        if limit is None:
            return True  # an adaptive concurrency limit: nothing shared to check against
        try:
            held = self._core.held(url)
            recorded, foreign = await shared.confirm(
                url, held, limit, ticket.weight, int(ticket.priority)
            )
        except asyncio.CancelledError:
            lease.release()  # the next figure published corrects one recorded just now
            raise
        if foreign is not None:
            self._core.observe_foreign(url, foreign, self._clock.now())
        if recorded is False:
            lease.discard()
            self._core.refused(lease.lease_id, self._clock.now())
            self._mark_dirty(url)  # the figure Redis may hold includes the refused bytes
        self._dispatch()
        return recorded is not False

    def reconfigure(self, config: AdmissionConfig) -> None:
        """Hot reload: state, queue and leases of backends whose URL persists are kept."""
        self._core.reconfigure(config, self._clock.now())
        self._dispatch()
        if self._started:
            self._sync_monitors()

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._started = True
        self._sync_monitors()
        if self._shared is not None:
            self._heartbeat = asyncio.get_running_loop().create_task(
                self._beat_forever(self._shared)
            )

    async def close(self) -> None:
        self._started = False
        monitors, self._monitors = self._monitors, {}
        await asyncio.gather(*(m.stop() for m in monitors.values()))
        for task in (self._heartbeat, self._publish):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._heartbeat = self._publish = None
        if self._shared is not None:
            await self._shared.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiters, self._waiters = self._waiters, {}
        for entry_id, fut in waiters.items():
            self._core.cancel(entry_id)
            if not fut.done():
                msg = "gateway shutting down"
                fut.set_result(Rejection(Outcome.SHED_OVERLOAD, 1.0, msg))
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def snapshot(self) -> dict[str, object]:
        return self._core.snapshot(self._clock.now())

    def caches_prefixes(self, model: str) -> bool:
        return self._core.caches_prefixes(model)

    def any_ready(self) -> bool:
        return self._core.any_serving(self._clock.now())

    @property
    def waiting(self) -> int:
        """Requests currently waiting in ``acquire``."""
        return len(self._waiters)

    # -- feedback -----------------------------------------------------------------------------

    def observe_health(self, model: str, url: str, health: Health) -> None:
        self._core.observe_health(model, url, health, self._clock.now())
        self._dispatch()

    def observe_signals(self, model: str, url: str, signals: BackendSignals) -> None:
        self._core.observe_signals(model, url, signals, self._clock.now())
        self._dispatch()

    def _mark_started(self, lease_id: int) -> None:
        self._core.started(lease_id)

    def _first_token(self, lease_id: int) -> None:
        self._core.first_token(lease_id)

    def _release(
        self,
        lease_id: int,
        output_tokens: int | None,
        ttft_s: float | None,
        failure: Failure | None,
    ) -> None:
        url = self._core.lease_url(lease_id) if self._shared is not None else None
        self._core.release(
            lease_id,
            output_tokens=output_tokens,
            ttft_s=ttft_s,
            failure=failure,
            now=self._clock.now(),
        )
        if url is not None:
            self._mark_dirty(url)
        self._dispatch()

    # -- shared reservations ------------------------------------------------------------------

    @property
    def shared_degraded(self) -> bool:
        return self._shared is not None and self._shared.degraded

    def _mark_dirty(self, url: str) -> None:
        """Publish this replica's lower figure soon: releases in one loop turn share a call."""
        self._dirty.add(url)
        if self._publish is None and self._started:
            self._publish = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty:
                urls, self._dirty = self._dirty, set()
                await self._beat(urls)
        finally:
            self._publish = None

    def _on_shared_switch(self, degraded: bool) -> None:
        replicas = self._shared.replicas if self._shared is not None and degraded else 1
        self._core.set_share(self._base_share / replicas, self._clock.now())
        self._dispatch()

    async def _beat_forever(self, shared: SharedLink) -> None:
        """Every backend each ``refresh_s``; those with requests waiting ten times as often, so
        a replica that waits hears of freed memory (and publishes its demand) sooner."""
        for tick in itertools.count():
            urls = {bc.url for _, bc in self._core.backends()}
            if tick % _WAITING_BEATS:
                urls = {url for url in urls if self._core.waiting_weight(url) > 0}
            await self._beat(urls)
            await asyncio.sleep(shared.refresh_s / _WAITING_BEATS)

    async def _beat(self, urls: set[str]) -> None:
        shared = self._shared
        if shared is None:
            return
        ordered = sorted(urls)
        now = self._clock.now()
        answers = await asyncio.gather(
            *(
                shared.beat(
                    url,
                    self._core.held(url),
                    self._core.waiting_weight(url),
                    self._core.url_ceiling(url, now),
                    self._core.waiting_band(url),
                )
                for url in ordered
            )
        )
        now = self._clock.now()
        for url, foreign in zip(ordered, answers, strict=True):
            if foreign is not None and not shared.degraded:
                self._core.observe_foreign(url, foreign, now)
        self._dispatch()

    # -- plumbing -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand the core's decisions to their waiters; re-arm the timer."""
        while events := self._core.take_events():
            for entry_id, verdict in events:
                fut = self._waiters.pop(entry_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(verdict)
                elif isinstance(verdict, Placement):
                    # its waiter is gone: give the room back rather than leak it
                    self._core.release(
                        verdict.lease_id,
                        output_tokens=None,
                        ttft_s=None,
                        failure=None,
                        now=self._clock.now(),
                    )
        self._reschedule()

    def _reschedule(self) -> None:
        if not self._waiters and self._timer is None:
            return  # time alone changes decisions only for queued requests, and none waits
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self._clock.now()
        wake = self._core.next_wakeup(now)
        if wake is None:
            return
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can be waiting
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, wake - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._core.tick(self._clock.now())
        self._dispatch()

    def _sync_monitors(self) -> None:
        wanted = {(model, bc.url): bc for model, bc in self._core.backends()}
        for key in list(self._monitors):
            current = self._monitors[key]
            if key not in wanted or current.config != wanted[key]:
                del self._monitors[key]
                current.cancel()
        for key, bc in wanted.items():
            if key not in self._monitors:
                self._monitors[key] = monitor = self._monitor(key[0], bc)
                monitor.start()

    def _monitor(self, model: str, bc: BackendConfig) -> BackendMonitor:
        if self._session is None:
            raise RuntimeError("Admitter.start() must run before monitors exist")
        return BackendMonitor(
            bc,
            session=self._session,
            clock=self._clock,
            on_health=lambda h: self.observe_health(model, bc.url, h),
            on_signals=lambda s: self.observe_signals(model, bc.url, s),
        )
