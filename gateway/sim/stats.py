"""What the simulated GPU did, for the load-test harness: counters, and time integrals in
simulated seconds (busy, idle, loading, KV held), kept by the engine as it runs."""

from __future__ import annotations

from typing import Literal, NamedTuple, Protocol

import msgspec

from gateway.sim.allocator import fragmentation_ratio


class BlockPool(Protocol):
    """The view of an allocator that stats need."""

    @property
    def total_blocks(self) -> int: ...
    @property
    def used_blocks(self) -> int: ...
    @property
    def free_blocks(self) -> int: ...
    @property
    def largest_free_blocks(self) -> int: ...


class ProcessCounters(NamedTuple):
    """Counters as the simulated server process exports them: they restart from zero when it
    crashes or restarts, as a real server's do (``EngineStats`` keeps the run's totals)."""

    preemptions: int
    prompt_tokens: int
    generated_tokens: int
    oom_errors: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class EngineStats(msgspec.Struct, kw_only=True, frozen=True):
    """A snapshot. Times are simulated seconds since the engine started; ``busy_s + idle_s +
    loading_s`` is the whole span. Averages are time-weighted over the span that was not loading.

    The engine is work-conserving (it steps whenever anything runs or waits and it is not
    loading), so ``idle_s`` is time with no request inside the simulator at all: idle while a
    gateway in front held requests back shows up here, as gaps."""

    now_s: float
    phase: Literal["loading", "warming", "ready"]
    running: int
    waiting: int
    max_running: int
    submitted: int
    finished: int
    cancelled: int
    failed: int  # OOM, crash and restart victims together
    oom_errors: int
    crashes: int
    restarts: int
    preemptions: int
    prompt_tokens: int  # each request's prompt, counted once
    prefill_tokens: int  # tokens actually prefilled, recomputation after preemption included
    generated_tokens: int
    # prefix caching, in tokens: the prompts of requests that looked up the cache (a preempted
    # one's second lookup apart, as vLLM), and how many of those tokens were found there
    prefix_cache_queries: int
    prefix_cache_hits: int
    steps: int
    mean_batch: float  # sequences per step, averaged over steps
    busy_s: float
    idle_s: float
    loading_s: float
    idle_gaps: int  # separate idle periods that ended with a new request
    longest_idle_gap_s: float
    kv_utilisation_avg: float  # blocks held / all blocks, 0..1
    kv_filled_avg: float  # tokens actually in the cache / cache capacity in tokens, 0..1
    kv_usage: float  # blocks held / all blocks, now
    free_blocks: int  # evictable cached blocks included
    evictable_blocks: int  # free blocks still holding a cached prefix
    largest_free_block_bytes: int
    fragmentation_ratio: float


class StatsRecorder:
    """Mutable counters the engine bumps; integrals advance only through ``ran_step`` (busy) and
    the idle/loading bookkeeping, so the engine stays the only writer of time."""

    def __init__(self, start_s: float, ready_s: float) -> None:
        self.start_s = start_s
        self._load_start_s = start_s
        self._ready_s = ready_s
        self._loading_done_s = 0.0  # completed load windows
        self._idle_since: float | None = ready_s
        self.idle_gaps = 0
        self.longest_idle_gap_s = 0.0
        self.busy_s = 0.0
        self.kv_block_s = 0.0
        self.kv_token_s = 0.0
        self.kv_tokens = 0  # tokens in the cache now; the engine keeps it current
        self.steps = 0
        self.batch_sum = 0
        self.submitted = 0
        self.finished = 0
        self.cancelled = 0
        self.failed = 0
        self.oom_errors = 0
        self.crashes = 0
        self.restarts = 0
        self.preemptions = 0
        self.prompt_tokens = 0
        self.prefill_tokens = 0
        self.generated_tokens = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.max_running = 0
        self._base = ProcessCounters(0, 0, 0, 0, 0, 0)

    def _totals(self) -> ProcessCounters:
        return ProcessCounters(
            self.preemptions,
            self.prompt_tokens,
            self.generated_tokens,
            self.oom_errors,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
        )

    def since_restart(self) -> ProcessCounters:
        now, base = self._totals(), self._base
        return ProcessCounters(*(a - b for a, b in zip(now, base, strict=True)))

    def ran_step(self, duration_s: float, batch: int, prefill: int, used_blocks: int) -> None:
        """Account one step; ``used_blocks`` and ``kv_tokens`` are held for all of it."""
        self.steps += 1
        self.batch_sum += batch
        self.busy_s += duration_s
        self.kv_block_s += used_blocks * duration_s
        self.kv_token_s += self.kv_tokens * duration_s
        self.prefill_tokens += prefill
        self.generated_tokens += batch

    def went_idle(self, now: float) -> None:
        self._idle_since = now

    def work_arrived(self, now: float) -> None:
        if self._idle_since is None:
            return
        gap = now - self._idle_since
        self._idle_since = None
        if gap > 0.0:
            self.idle_gaps += 1
            self.longest_idle_gap_s = max(self.longest_idle_gap_s, gap)

    def began_loading(self, now: float, ready_s: float) -> None:
        self._loading_done_s += min(now, self._ready_s) - self._load_start_s
        self._load_start_s = now
        self._ready_s = ready_s
        self._idle_since = ready_s
        self._base = self._totals()

    def loading_s(self, now: float) -> float:
        return self._loading_done_s + max(0.0, min(now, self._ready_s) - self._load_start_s)

    def snapshot(
        self,
        *,
        now: float,
        phase: Literal["loading", "warming", "ready"],
        running: int,
        waiting: int,
        alloc: BlockPool,
        evictable_blocks: int,
        block_size: int,
        kv_bytes_per_token: int,
    ) -> EngineStats:
        loading = self.loading_s(now)
        serving = now - self.start_s - loading
        total_blocks = alloc.total_blocks
        free = alloc.free_blocks
        largest = alloc.largest_free_blocks
        return EngineStats(
            now_s=now - self.start_s,
            phase=phase,
            running=running,
            waiting=waiting,
            max_running=self.max_running,
            submitted=self.submitted,
            finished=self.finished,
            cancelled=self.cancelled,
            failed=self.failed,
            oom_errors=self.oom_errors,
            crashes=self.crashes,
            restarts=self.restarts,
            preemptions=self.preemptions,
            prompt_tokens=self.prompt_tokens,
            prefill_tokens=self.prefill_tokens,
            generated_tokens=self.generated_tokens,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            steps=self.steps,
            mean_batch=self.batch_sum / self.steps if self.steps else 0.0,
            busy_s=self.busy_s,
            idle_s=max(0.0, serving - self.busy_s),
            loading_s=loading,
            idle_gaps=self.idle_gaps,
            longest_idle_gap_s=self.longest_idle_gap_s,
            kv_utilisation_avg=self.kv_block_s / total_blocks / serving if serving > 0 else 0.0,
            kv_filled_avg=(
                self.kv_token_s / (total_blocks * block_size) / serving if serving > 0 else 0.0
            ),
            kv_usage=alloc.used_blocks / total_blocks,
            free_blocks=free,
            evictable_blocks=evictable_blocks,
            largest_free_block_bytes=largest * block_size * kv_bytes_per_token,
            fragmentation_ratio=fragmentation_ratio(free, largest),
        )
