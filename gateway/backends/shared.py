"""The link between this replica's admission and the shared reservations in Redis, and what it
does while Redis is lost.

``SharedLink`` wraps ``gateway.store.reservations.RedisReservations``. While Redis answers, each
placement is confirmed by one ``reserve`` call before the request is forwarded, and releases and
a periodic heartbeat publish this replica's figure per backend and bring back the other
replicas' (``gateway.core.shared`` has the semantics). When a call fails (an error, or no reply
within the store's tight timeout) the link is *degraded*: admission then plans ``1/replicas`` of
every backend with no call to Redis at all, so no request waits on a dead Redis beyond the one
timeout that found it dead. The heartbeat keeps trying each refresh interval; its first success
ends the degraded state (its absolute figures make a resynchronisation unnecessary). Every switch
is logged and reported to ``on_switch`` (the metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.store.base import StoreError
from gateway.store.reservations import RedisReservations

_log = logging.getLogger(__name__)


class SharedLink:
    """See the module docstring. ``replicas``: gateways sharing the backends, for the share each
    plans while degraded."""

    __slots__ = ("_degraded", "_listeners", "refresh_s", "replicas", "store")

    def __init__(
        self,
        store: RedisReservations,
        *,
        replicas: int,
        refresh_s: float = 0.25,
        on_switch: Callable[[bool], None] | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if refresh_s <= 0:
            raise ValueError("refresh_s must be > 0")
        self.store = store
        self.replicas = replicas
        self.refresh_s = refresh_s
        self._listeners: list[Callable[[bool], None]] = []
        if on_switch is not None:
            self._listeners.append(on_switch)
        self._degraded = False

    def listen(self, on_switch: Callable[[bool], None]) -> None:
        """Call ``on_switch(degraded)`` on every switch."""
        self._listeners.append(on_switch)

    @property
    def degraded(self) -> bool:
        return self._degraded

    @property
    def share(self) -> float:
        """The share of every backend this replica plans now."""
        return 1.0 / self.replicas if self._degraded else 1.0

    async def confirm(
        self, backend: str, nbytes: int, limit: float, weight: float = 1.0, band: int = 0
    ) -> tuple[bool | None, int | None]:
        """(True: recorded, False: refused, None: degraded, decided locally; the foreign bytes
        when Redis answered). A failure now degrades the link and refuses: the placement was
        planned on the whole backend and must be planned again on this replica's share."""
        if self._degraded:
            return None, None
        try:
            recorded, foreign = await self.store.reserve(backend, nbytes, limit, weight, band)
        except StoreError as exc:
            self._switch(True, exc)
            return False, None
        return recorded, foreign

    async def beat(
        self,
        backend: str,
        nbytes: int,
        want: float = 0.0,
        limit: float | None = None,
        band: int | None = None,
    ) -> int | None:
        """Publish this replica's figure, demand and best band waiting; the foreign bytes, or
        None when Redis did not answer."""
        try:
            foreign = await self.store.beat(backend, nbytes, want, limit, band)
        except StoreError as exc:
            self._switch(True, exc)
            return None
        self._switch(False, None)
        return foreign

    def _switch(self, degraded: bool, exc: StoreError | None) -> None:
        if degraded == self._degraded:
            return  # calls in flight when the state changed report it again
        self._degraded = degraded
        if degraded:
            _log.warning(
                "shared admission lost Redis (%s); planning 1/%d of every backend until it answers",
                exc,
                self.replicas,
            )
        else:
            _log.warning("shared admission reached Redis again; planning whole backends")
        for listener in self._listeners:
            listener(degraded)

    async def close(self) -> None:
        await self.store.close()
