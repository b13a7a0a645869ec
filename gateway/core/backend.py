"""One backend as the gateway sees it: its configuration, the signals it last reported, and its
runtime state (``BackendRuntime``: life cycle, what this gateway holds there, pressure, the
adaptive limit), with the questions admission asks of it. Pure: every method takes ``now``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gateway.core.adaptive import AdaptiveLimit
from gateway.core.capacity import (
    CapacityConfig,
    CapacityKind,
    CapacityView,
    Pressure,
    Room,
    round_up_tokens,
)
from gateway.core.lifecycle import Health, Lifecycle
from gateway.core.overcommit import Overcommit
from gateway.core.prefixes import PrefixIndex
from gateway.core.types import Phase

if TYPE_CHECKING:
    from gateway.core.pool import Ticket

_NEAR_FULL = 0.95
_QUEUE_SLACK = 0.1  # beyond what a backend with a queue of its own runs, a share to keep it busy


class Signals(enum.StrEnum):
    """Which metric vocabulary a backend speaks (``gateway.backends.flavors`` maps the names)."""

    VLLM = "vllm"
    SGLANG = "sglang"
    TGI = "tgi"
    LLAMACPP = "llamacpp"
    GENERIC = "generic"
    NONE = "none"  # health only


class MemoryKind(enum.StrEnum):
    PAGED = "paged"  # KV blocks grow with the sequence (vLLM, SGLang)
    CONTIGUOUS = "contiguous"  # prompt + max_tokens allocated up front: an overrun is an OOM
    SLOTS = "slots"  # a fixed number of sequences, each holding one whole slot (llama.cpp)


class ReserveMode(enum.StrEnum):
    LIKELY = "likely"  # prompt + a high quantile of observed output lengths (≤ max_tokens)
    WORST_CASE = "worst_case"  # prompt + max_tokens


# Members read on every request, bound once: on Python 3.11 a read off the class goes through
# the enum metaclass's ``__getattr__`` hook (about 140 ns a read; 3.12 dropped it).
_BYTES = CapacityKind.BYTES
_SLOTS = CapacityKind.SLOTS
_CONTIGUOUS = MemoryKind.CONTIGUOUS


Failure = Literal["connect", "5xx", "oom", "timeout"]
"""How a request placed on a backend failed there, as the proxy reports it."""

DEFAULT_LOAD_S = 60.0
"""A first load's predicted length when the policy names none: vLLM, SGLang and TGI load
weights, profile the KV cache and capture graphs for about a minute."""
TYPICAL_LOAD_S: dict[Signals, float] = {Signals.LLAMACPP: 10.0}
"""Flavors that load faster: llama.cpp maps a GGUF file and is up in seconds."""

DEFAULT_BLOCK_SIZE = 16  # tokens per KV block when neither the policy nor the metrics tell


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """A compiled backend entry of the policy. Sizes in bytes, durations in seconds."""

    url: str
    signals: Signals = Signals.VLLM
    kv_capacity_bytes: int | None = None
    memory: MemoryKind = MemoryKind.PAGED
    reserve: ReserveMode | None = None  # None: paged → likely, otherwise worst_case
    block_size: int | None = None
    warmup_s: float = 60.0
    expected_load_s: float | None = None  # None: the flavor's typical first load
    probe_interval_s: float = 1.0
    max_concurrency: int | None = None
    metrics_path: str = "/metrics"
    # (signal, metric name) pairs the policy's ``metrics.names`` overrides
    metric_names: tuple[tuple[str, str], ...] = ()
    health_path: str = "/health"
    api_key: str | None = field(default=None, repr=False)
    # Derived from the fields above once, not per request (admission reads them several times).
    memory_kind: MemoryKind = field(init=False)
    reserve_mode: ReserveMode = field(init=False)
    first_load_s: float = field(init=False)

    def __post_init__(self) -> None:
        # llama.cpp serves whole slots whatever the policy says about memory.
        kind = MemoryKind.SLOTS if self.signals is Signals.LLAMACPP else self.memory
        mode = self.reserve
        if mode is None:
            mode = ReserveMode.LIKELY if kind is MemoryKind.PAGED else ReserveMode.WORST_CASE
        object.__setattr__(self, "memory_kind", kind)
        object.__setattr__(self, "reserve_mode", mode)
        load = self.expected_load_s
        if load is None:
            load = TYPICAL_LOAD_S.get(self.signals, DEFAULT_LOAD_S)
        object.__setattr__(self, "first_load_s", load)


@dataclass(frozen=True, slots=True)
class BackendSignals:
    """One scrape of a backend's metrics, normalised. ``at`` is the monotonic time of the scrape.

    Every field is optional: a backend reports what its flavor exposes. ``kv_usage`` is a share
    in [0, 1]; capacities are in tokens (KV blocks * block size) so the model's bytes per token
    converts them; ``largest_free_block_bytes`` is in bytes.
    """

    at: float
    kv_usage: float | None = None
    capacity_tokens: int | None = None
    used_tokens: float | None = None
    block_size: int | None = None
    running: float | None = None
    waiting: float | None = None
    preemptions_total: float | None = None
    fragmentation: float | None = None
    largest_free_block_bytes: float | None = None
    total_slots: int | None = None
    slot_ctx_tokens: int | None = None
    prefix_caching: bool | None = None  # the backend says it reuses cached prompt prefixes


class BackendRuntime:
    """Everything the gateway tracks about one backend: life cycle, last signals, what its own
    requests hold there (``reserved_bytes``, ``inflight``), pressure and the adaptive limit."""

    def __init__(
        self, config: BackendConfig, *, kv_bytes_per_token: int, cap: CapacityConfig, now: float
    ) -> None:
        self.config = config
        self.kv_bytes_per_token = kv_bytes_per_token
        self.cap = cap
        self.lifecycle = Lifecycle(
            warmup_s=config.warmup_s,
            floor=cap.warmup_floor,
            eject_failures=cap.eject_failures,
            cooldown_s=cap.eject_cooldown_s,
            expected_load_s=config.first_load_s,
            now=now,
        )
        self.signals: BackendSignals | None = None
        self.reserved_bytes = 0
        self.inflight = 0
        # Other gateway replicas' reservations here, as the shared store last reported them:
        # bytes, or slots on a slot backend (``observe_foreign``).
        self.foreign_bytes = 0
        self.foreign_slots = 0
        # This process's share of the backend: 1, or 1/replicas while the shared store is lost
        # (and 1/workers for workers without one).
        self.share = 1.0
        self.pressure = Pressure()
        self.overcommit = Overcommit()
        self.adaptive = AdaptiveLimit(
            initial=config.max_concurrency, max_limit=config.max_concurrency
        )
        self._reserved_at_scrape = 0
        self._pending_at_scrape = 0
        self._placed_since_scrape = 0
        # Since the last scrape: reservations placed and still held, and the KV freed by
        # requests the scrape saw running (``unplace``); the gauge shows neither yet.
        self._live_since_scrape = 0
        self._freed_since_scrape = 0
        self._scrape_at = -math.inf
        self._inflight_at_scrape = 0
        self._capacity_tokens: int | None = None
        self._slots: int | None = None
        self._slot_ctx: int | None = None
        self._block_size: int | None = None
        # what was sent here, while the backend says it caches prompt prefixes
        self.prefixes: PrefixIndex | None = None
        self._derive()

    def retune(
        self, config: BackendConfig, *, kv_bytes_per_token: int, cap: CapacityConfig
    ) -> None:
        """Adopt a reloaded policy entry for the same URL; state and reservations stay."""
        self.config = config
        self.kv_bytes_per_token = kv_bytes_per_token
        self.cap = cap
        self.lifecycle.retune(
            warmup_s=config.warmup_s,
            floor=cap.warmup_floor,
            eject_failures=cap.eject_failures,
            cooldown_s=cap.eject_cooldown_s,
            expected_load_s=config.first_load_s,
        )
        if config.max_concurrency is not None:
            self.adaptive.max_limit = float(config.max_concurrency)
            self.adaptive.limit = min(self.adaptive.limit, self.adaptive.max_limit)
        self._derive()

    @property
    def url(self) -> str:
        return self.config.url

    # -- its life cycle, as admission asks about it ----------------------------------------------

    def serving(self, now: float) -> bool:
        """May receive traffic now (warming or ready)."""
        return self.lifecycle.serving(now)

    def ready(self, now: float) -> bool:
        """Fully up: neither loading, warming nor ejected."""
        return self.serving(now) and self.lifecycle.phase is Phase.READY

    def capacity_factor(self, now: float) -> float:
        return self.lifecycle.capacity_factor(now)

    def predicted_ready_at(self, now: float) -> float:
        return self.lifecycle.predicted_ready_at(now)

    def load_overdue(self, now: float) -> bool:
        """Loading for longer than its load was predicted to take."""
        return self.lifecycle.load_overdue(now)

    def next_change_at(self, now: float) -> float | None:
        return self.lifecycle.next_change_at(now)

    def free_when_up_bytes(self) -> float:
        """KV bytes this backend will have free the moment it serves again (at its warm-up
        floor); 0 where its capacity is not counted in bytes."""
        if self._kind is not CapacityKind.BYTES:
            return 0.0
        factor = self.cap.warmup_floor if self.config.warmup_s > 0 else 1.0
        usable = float(self._total_bytes or 0) * (1.0 - self.cap.headroom) * factor * self.share
        return max(0.0, usable - self.reserved_bytes - self.foreign_bytes)

    def observe_health(self, health: Health, now: float) -> None:
        self.lifecycle.observe_health(health, now)

    def finished(
        self,
        need_bytes: int,
        *,
        failure: Failure | None,
        ttft_s: float | None,
        now: float,
        placed_at: float | None = None,
        held_bytes: int = 0,
    ) -> None:
        """A request placed here ended: free its reservation and learn from how it went
        (nothing listening: it is down until a probe finds it up; 5xx and timeouts count
        towards ejection; an OOM is memory pressure). ``held_bytes``: the KV it held when it
        ended, as far as known (0: unknown)."""
        self.unplace(need_bytes, placed_at=placed_at, held_bytes=held_bytes)
        if failure == "connect":
            self.lifecycle.went_down(now)
        elif failure == "oom":
            self.report_oom(now)
        elif failure is not None:
            self.lifecycle.record_failure(now)
            self.adaptive.on_drop(now)
        else:
            self.lifecycle.record_success()
            if ttft_s is not None:
                self.lifecycle.first_token(ttft_s, now)
            self.adaptive.on_sample(
                ttft_s=ttft_s, inflight=self.inflight + 1, dropped=False, now=now
            )

    def answering(self) -> None:
        self.lifecycle.answering()

    def describe(self, now: float) -> dict[str, object]:
        """Plain data for the admin view and metrics."""
        v = self.view(now)
        return {
            "url": self.url,
            "phase": v.phase.value,
            "kind": v.kind.value,
            "capacity": v.total,
            "usable": v.usable,
            "free": v.free,
            "reserved_bytes": self.reserved_bytes,
            "foreign_bytes": self.foreign_bytes,
            "foreign_slots": self.foreign_slots,
            "share": self.share,
            "inflight": self.inflight,
            "fragmentation": v.fragmentation,
            "stale": v.stale,
            "pressure": self.pressure.value(now),
            "overcommit": self.overcommit.value,
            "adaptive_limit": self.adaptive.value,
            "load_estimate_s": self.lifecycle.predicted_load_s,
            "last_load_error_s": self.lifecycle.last_load_error_s,
            "failures": self.lifecycle.failures,
        }

    @property
    def block_size(self) -> int:
        return self.config.block_size or self._block_size or DEFAULT_BLOCK_SIZE

    def apply_signals(self, sig: BackendSignals, now: float, *, pending_bytes: int = 0) -> None:
        """Take a scrape; infer pressure from its change since the previous one.
        ``pending_bytes``: what this gateway placed here that the backend may not have
        allocated yet when it answered the scrape."""
        prev = self.signals
        usage = self._usage(sig)
        preempted = False
        if prev is not None and now - prev.at <= self.cap.stale_after_s:
            preempted = _rose(prev.preemptions_total, sig.preemptions_total)
            # A paged backend with a usage gauge answers a preemption through its overcommit
            # alone: cutting pressure too would halve the reaction to one event.
            tuned = usage is not None and self.config.memory_kind is MemoryKind.PAGED
            if preempted:
                if not tuned:
                    self.pressure.cut(now)
                self.adaptive.on_drop(now)
            if usage is not None and usage >= _NEAR_FULL and _rose(prev.waiting, sig.waiting):
                self.pressure.cut(now)
            if tuned and usage is not None:
                planned = self.view(now).usable * self.overcommit.value
                self.overcommit.observe(
                    usage=usage,
                    target=1.0 - self.cap.headroom,
                    reserved_share=self.reserved_bytes / planned if planned > 0 else 0.0,
                    preempted=preempted,
                    backend_queue=_queues(sig),
                )
        if self.lifecycle.phase is Phase.WARMING:
            # a queue seen once may be requests sent since the last step; one that is still
            # there, no shorter, a scrape later stands: the backend is not keeping up
            queued = (
                prev is not None
                and _queues(prev)
                and _queues(sig)
                and (sig.waiting or 0.0) >= (prev.waiting or 0.0)
            )
            if preempted or queued:
                self.lifecycle.fell_behind(now)
            else:
                self.lifecycle.kept_up(used=self._used_share(now), now=now)
        self.signals = sig
        self._reserved_at_scrape = self.reserved_bytes
        self._pending_at_scrape = pending_bytes
        self._placed_since_scrape = 0
        self._live_since_scrape = 0
        self._freed_since_scrape = 0
        self._scrape_at = now
        self._inflight_at_scrape = self.inflight
        self._capacity_tokens = sig.capacity_tokens or self._capacity_tokens
        self._slots = sig.total_slots or self._slots
        self._slot_ctx = sig.slot_ctx_tokens or self._slot_ctx
        if sig.prefix_caching is not None and sig.prefix_caching != (self.prefixes is not None):
            self.prefixes = PrefixIndex(0) if sig.prefix_caching else None
        self._block_size = sig.block_size or self._block_size
        self._derive()

    def _used_share(self, now: float) -> float:
        """The share of what may be used here now that is taken (by reservations, or by what
        the usage gauge shows); 1 when nothing may be."""
        v = self.view(now)
        return 1.0 - max(0.0, v.free) / v.usable if v.usable > 0 else 1.0

    def _derive(self) -> None:
        """What only the policy and the last scrape change, computed when they change (every
        placement reads them)."""
        configured = self.config.kv_capacity_bytes
        if self._capacity_tokens is None:
            self._total_bytes = configured
        else:
            reported = self._capacity_tokens * self.kv_bytes_per_token
            self._total_bytes = reported if configured is None else min(configured, reported)
        if self.config.memory_kind is MemoryKind.SLOTS:
            self._kind = CapacityKind.SLOTS
        elif self._total_bytes is None:
            self._kind = CapacityKind.CONCURRENCY
        else:
            self._kind = CapacityKind.BYTES

    def report_oom(self, now: float) -> None:
        self.pressure.cut(now)
        self.adaptive.on_drop(now)
        self.lifecycle.fell_behind(now)

    def fresh_signals(self, now: float) -> BackendSignals | None:
        sig = self.signals
        if sig is None or now - sig.at > self.cap.stale_after_s:
            return None
        return sig

    def total_bytes(self) -> int | None:
        """KV bytes of the backend: the smaller of the policy's and the metrics' figure."""
        return self._total_bytes

    def kind(self) -> CapacityKind:
        return self._kind

    def view(self, now: float) -> CapacityView:
        factor = self.lifecycle.capacity_factor(now)
        sig = self.fresh_signals(now)
        kind = self.kind()
        phase = self.lifecycle.phase
        if kind is _BYTES:
            return self._bytes_view(now, factor, sig)
        if kind is _SLOTS:
            slots = self._total_slots()
            usable = _whole(slots * factor * self.pressure.value(now) * self.share)
            # the scrape saw other replicas' requests as of then; the shared store's figure
            # may be newer
            foreign = float(self.foreign_slots)
            if sig is not None and sig.running is not None:
                foreign = max(foreign, sig.running - self._inflight_at_scrape)
            free = usable - self.inflight - foreign
            return CapacityView(kind, phase, slots, usable, free, None, None, sig is None)
        limit = self.adaptive.value
        usable = _whole(limit * factor * self.share)
        return CapacityView(
            kind, phase, limit, usable, usable - self.inflight, None, None, sig is None
        )

    def _bytes_view(self, now: float, factor: float, sig: BackendSignals | None) -> CapacityView:
        total = float(self.total_bytes() or 0)
        frag = None if sig is None else sig.fragmentation
        largest = None if sig is None else sig.largest_free_block_bytes
        usable = total * (1.0 - self.cap.headroom) * factor * self.pressure.value(now) * self.share
        own = float(self.reserved_bytes)
        usage = None if sig is None else self._usage(sig)
        if usage is None:
            free = usable - own - self.foreign_bytes
        else:
            # Fresh usage: reservations may exceed usable by the learned overcommit, and what
            # was admitted since the scrape must fit in what the gauge left under usable.
            real_total = (
                float(self._capacity_tokens * self.kv_bytes_per_token)
                if self._capacity_tokens
                else total
            )
            # the gauge saw other replicas' requests as of the scrape; the shared store's
            # figure may be newer
            foreign = max(usage * real_total - self._reserved_at_scrape, self.foreign_bytes, 0.0)
            admitted_since = self._live_since_scrape - self._freed_since_scrape
            gauge_left = usable - usage * real_total - admitted_since
            free = min(usable * self.overcommit.value - own - foreign, gauge_left)
        if frag is not None and largest is None:
            # Only the ratio is known: the fragmented share of what is free cannot be used.
            # (With the largest free block known, each request is held to it instead.)
            free = min(free, max(0.0, free) * (1.0 - frag))
        return CapacityView(
            _BYTES,
            self.lifecycle.phase,
            total,
            usable,
            free,
            frag,
            largest,
            sig is None,
        )

    def _usage(self, sig: BackendSignals) -> float | None:
        if sig.kv_usage is not None:
            return min(1.0, max(0.0, sig.kv_usage))
        capacity = sig.capacity_tokens or self._capacity_tokens
        if not capacity and self._total_bytes:
            # Current TGI no longer reports its pool size: the policy's capacity stands in.
            capacity = self._total_bytes // self.kv_bytes_per_token
        if sig.used_tokens is not None and capacity:
            return min(1.0, max(0.0, sig.used_tokens / capacity))
        return None

    def cached_tokens(self, ticket: Ticket) -> int:
        """Prompt tokens of ``ticket`` this backend likely holds from earlier prompts."""
        index = self.prefixes
        if index is None or not ticket.prefix:
            return 0
        cached = int(index.cached_chunks(ticket.prefix) * ticket.chunk_tokens)
        return max(0, min(cached, ticket.prompt_tokens - 1))

    def remember(self, ticket: Ticket) -> None:
        """``ticket``'s prompt was placed here: its prefix is cached once prefilled."""
        index = self.prefixes
        if index is None or not ticket.prefix or ticket.chunk_tokens <= 0:
            return
        # the cache holds at most the whole KV memory's worth of chunks
        total = self._total_bytes or 0
        index.capacity = int(total / (ticket.kv_bytes_per_token * ticket.chunk_tokens))
        index.remember(ticket.prefix)

    def need_bytes(self, tokens: int, kv_bytes_per_token: int) -> int:
        """KV bytes a request of ``tokens`` (prompt + reserved output) takes here."""
        return round_up_tokens(tokens, self.block_size) * kv_bytes_per_token

    def can_ever_hold(self, need_bytes: int, prompt_tokens: int) -> bool:
        """False when the request could not fit even on this backend idle and fully warm
        (bytes backends), or its prompt exceeds a slot's context (llama.cpp refuses those)."""
        kind = self.kind()
        if kind is _BYTES:
            return need_bytes <= (self.total_bytes() or 0) * (1.0 - self.cap.headroom)
        if kind is _SLOTS and self._slot_ctx is not None:
            return prompt_tokens <= self._slot_ctx
        return True

    def room(self, now: float) -> Room | None:
        """What one more request may take here now; None when nothing fits at all.

        Every condition on a request's bytes is an upper bound (free bytes, a reported largest
        free block, the large-request bound while fragmented), so one number says it.
        """
        if not self.lifecycle.serving(now):
            return None
        if self.config.max_concurrency is not None and self.inflight >= self.config.max_concurrency:
            return None
        if self._runs_all_it_can(now):
            return None
        v = self.view(now)
        if v.kind is not _BYTES:
            return None if v.free < 1 else Room(math.inf, v.free, by_bytes=False)
        limit = v.free
        if v.largest_free_bytes is not None:
            limit = min(limit, self._largest_free(v.largest_free_bytes))
        elif v.fragmentation is not None and v.fragmentation > self.cap.shed_above:
            limit = min(limit, self.cap.large_request * v.usable)
        return None if limit < 0 else Room(limit, v.free, by_bytes=True)

    def _runs_all_it_can(self, now: float) -> bool:
        """The backend queues requests of its own (its scheduler is bound by compute, sequence
        slots or memory): another request would only wait there, out of the gateway's order
        and deadlines. While the last scrape shows such a queue, what is in flight there stays
        at what the backend was running, plus a tenth to keep it busy as requests finish;
        requests of others (its queue and running beyond this gateway's) count against it."""
        sig = self.fresh_signals(now)
        if sig is None or sig.running is None or not sig.waiting:
            return False
        foreign = max(0.0, sig.running + sig.waiting - self._inflight_at_scrape)
        return self.inflight + foreign >= sig.running + _slack(sig.running)

    def too_fragmented(self, need_bytes: int, v: CapacityView) -> bool:
        """A large request avoids a backend whose fragmentation is above ``shed_above`` when
        only the ratio is known; with the largest free block reported, it waits until a block
        that large is free (small ones keep flowing; ageing keeps it from starving)."""
        return (
            v.fragmentation is not None
            and v.largest_free_bytes is None
            and v.fragmentation > self.cap.shed_above
            and need_bytes > self.cap.large_request * v.usable
        )

    def ceiling(self, now: float) -> float | None:
        """The most every replica together may hold here now (what a shared confirmation
        checks): bytes, or slots on a slot backend; None where capacity is an adaptive
        concurrency limit (each replica learns its own)."""
        factor = self.lifecycle.capacity_factor(now) * self.pressure.value(now)
        if self.kind() is CapacityKind.SLOTS:
            return _whole(self._total_slots() * factor)
        if self.kind() is not CapacityKind.BYTES:
            return None
        total = float(self.total_bytes() or 0)
        return total * (1.0 - self.cap.headroom) * factor * self.overcommit.value

    def shared_held(self) -> int:
        """What this process holds here in the unit ``ceiling`` counts: bytes, or slots."""
        return self.inflight if self.kind() is CapacityKind.SLOTS else self.reserved_bytes

    def observe_foreign(self, amount: int) -> bool:
        """Other replicas hold ``amount`` here (``ceiling``'s unit), as the shared store says;
        whether that changed what this one plans."""
        if self.kind() is CapacityKind.SLOTS:
            changed, self.foreign_slots = amount != self.foreign_slots, amount
        else:
            changed, self.foreign_bytes = amount != self.foreign_bytes, amount
        return changed

    def _total_slots(self) -> float:
        return float(self._slots or self.config.max_concurrency or self.adaptive.value)

    def place(self, need_bytes: int) -> None:
        self.reserved_bytes += need_bytes
        self.inflight += 1
        self._placed_since_scrape += need_bytes
        self._live_since_scrape += need_bytes

    def unplace(
        self, need_bytes: int, *, placed_at: float | None = None, held_bytes: int = 0
    ) -> None:
        """Free a reservation. One placed since the last scrape leaves what that scrape does
        not show; one the scrape saw running gives back the KV it held, at once: a backend frees
        a finished sequence's blocks when it ends, and waiting for the next scrape to see them
        left a tenth of an overloaded cache idle between scrapes. A contiguous server frees
        the whole region it allocated, the reservation."""
        self.reserved_bytes = max(0, self.reserved_bytes - need_bytes)
        self.inflight = max(0, self.inflight - 1)
        if placed_at is None or placed_at >= self._scrape_at:
            self._live_since_scrape = max(0, self._live_since_scrape - need_bytes)
        elif self.config.memory_kind is _CONTIGUOUS:
            self._freed_since_scrape += need_bytes
        else:
            self._freed_since_scrape += min(held_bytes, need_bytes)

    def _largest_free(self, reported: float) -> float:
        """A reported largest free block, less what may have been carved from it since.

        A contiguous server allocates when it starts a request, so a scrape reflects the
        requests it had started by then; the rest (pending at the scrape, or placed since) may
        still take their region out of that block. Holding each request to what is left after
        all of them keeps two requests from being promised one region."""
        if self.config.memory_kind is not MemoryKind.CONTIGUOUS:
            return reported
        return reported - self._pending_at_scrape - self._placed_since_scrape


def _whole(x: float) -> float:
    """Whole requests; at least one while any capacity is left at all."""
    if x <= 0:
        return 0.0
    return float(max(1, math.floor(x)))


def _slack(running: float) -> float:
    return max(1.0, _QUEUE_SLACK * running)


def _queues(sig: BackendSignals) -> bool:
    """The backend keeps a queue of its own: more waiting than a request or two between
    scheduler steps (a tenth of what it runs)."""
    if sig.waiting is None:
        return False
    return sig.waiting > _slack(sig.running or 0.0)


def _rose(before: float | None, after: float | None) -> bool:
    return before is not None and after is not None and after > before
