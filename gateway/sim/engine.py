"""The simulated GPU: continuous batching over a KV cache of blocks, in simulated seconds.

Pure and deterministic for a given ``SimConfig.seed``: no I/O, no clock. The engine keeps its own
``now``; ``step()`` moves it to the end of the step it runs and ``advance_to()`` moves an idle
engine forward. A driver (``gateway.sim.runtime``) paces the steps against wall time; a test or
the ceiling check can run them back to back.

A step is one forward pass: every decoding sequence gets one token. Newly admitted sequences are
prefilled, and a sequence's first token comes out of the step that prefills the last of its
prompt. With ``max_num_batched_tokens`` a step processes at most that many tokens (one per
decoding sequence, the rest prefill chunks, as vLLM's chunked prefill); without it a prompt is
prefilled whole in the step that admits it. Step duration, in seconds::

    (decode_step_s + step_per_seq_s * batch + attend_s_per_token * attended
     + prefill_tokens / prefill_tokens_per_s) * warm_up

where ``batch`` counts the sequences in the step and ``attended`` the KV tokens the decoding
ones read (their context, the new token included).

With ``prefix_caching`` (paged only, ``gateway.sim.prefix``) a request submitted with its
prompt's full-block hashes starts with the leading blocks already resident: it holds them
without computing them, so it prefills only the rest, and at least its last prompt token (as
vLLM, which needs that token's logits). Every block a caching sequence fills is cached: its
prompt's under the given hashes, its own later blocks under hashes only it can match, which a
preempted sequence finds again when it is readmitted.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Literal

from gateway.sim.allocator import ContiguousAllocator, PagedAllocator
from gateway.sim.config import SimConfig
from gateway.sim.prefix import PrefixCachingAllocator
from gateway.sim.stats import EngineStats, StatsRecorder

OOM_WINDOW_S = 10.0  # contiguous mode: oom_crash_after OOMs within this window crash the engine
MIB = 1 << 20

FailureKind = Literal["oom", "crash", "restart"]
FinishReason = Literal["stop", "length"]


class EngineLoading(Exception):
    """The engine is (re)loading and takes no requests; ``remaining_s`` until it is ready."""

    def __init__(self, remaining_s: float) -> None:
        super().__init__(f"loading, ready in {remaining_s:.3f} s")
        self.remaining_s = remaining_s


class ContextTooLong(ValueError):
    """Prompt plus requested output can never fit the whole KV cache (vLLM: max_model_len)."""

    def __init__(self, context_tokens: int, prompt_tokens: int, output_tokens: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_tokens} tokens. However, you "
            f"requested {prompt_tokens + output_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{output_tokens} in the completion). Please reduce the length of the prompt or "
            "completion."
        )


@dataclass(frozen=True, slots=True)
class Failure:
    seq_id: int
    kind: FailureKind
    message: str


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step did. ``failed`` happened at ``start_s`` (admission time); ``tokens`` (one
    per id) and ``finished`` are produced at ``start_s + duration_s``."""

    start_s: float
    duration_s: float
    prefill_tokens: int
    tokens: list[int]
    finished: list[tuple[int, FinishReason]]
    failed: list[Failure]


class _Seq:
    __slots__ = (
        "blocks",
        "cached",
        "cap",
        "chain",
        "full",
        "generated",
        "kv_tokens",
        "needed",
        "preempted",
        "prompt",
        "region",
        "seq_id",
        "target",
    )

    def __init__(
        self, seq_id: int, prompt: int, cap: int, target: int, chain: list[int] | None
    ) -> None:
        self.seq_id = seq_id
        self.prompt = prompt
        self.cap = cap  # most tokens it may generate (max_tokens)
        self.target = target  # tokens it will generate, 1..cap
        self.generated = 0  # tokens sent to the client so far; survives preemption
        self.kv_tokens = 0  # tokens whose K and V are in the cache
        self.needed = (
            0  # tokens to prefill since its (re)admission; decoding once kv_tokens reach it
        )
        self.blocks = 0  # blocks held (paged mode)
        self.region = -1  # first block of its region (contiguous mode)
        # prefix caching: hashes of its full blocks so far, None when it does not cache; the
        # hashes of the blocks it holds through the cache; its leading blocks offered to it
        self.chain = chain
        self.cached: list[int] = []
        self.full = 0
        self.preempted = False


def validate_config(config: SimConfig) -> None:
    """Raise ValueError naming every field whose value makes no sense for a simulation."""
    cfg = config
    rules = {
        "kv_blocks": cfg.kv_blocks > 0,
        "block_size": cfg.block_size > 0,
        "kv_bytes_per_token": cfg.kv_bytes_per_token > 0,
        "max_num_seqs": cfg.max_num_seqs > 0,
        "prefill_tokens_per_s": cfg.prefill_tokens_per_s > 0,
        "decode_step_s": cfg.decode_step_s >= 0,
        "step_per_seq_s": cfg.step_per_seq_s >= 0,
        "attend_s_per_token": cfg.attend_s_per_token >= 0,
        "max_num_batched_tokens": cfg.max_num_batched_tokens >= 0,
        "load_time_s": cfg.load_time_s >= 0,
        "slow_start_s": cfg.slow_start_s >= 0,
        "slow_start_factor": cfg.slow_start_factor >= 1,
        "oom_crash_after": cfg.oom_crash_after >= 0,
        "chars_per_token": cfg.chars_per_token > 0,
        "default_output_tokens": cfg.default_output_tokens > 0,
        "output_mean_ratio": cfg.output_mean_ratio > 0,
        "output_sigma": cfg.output_sigma >= 0,
        "time_scale": cfg.time_scale > 0,
        "prefix_caching": not (cfg.prefix_caching and cfg.mode == "contiguous"),
    }
    if cfg.decode_step_s + cfg.step_per_seq_s <= 0:
        rules["decode_step_s"] = False  # a step must take time, or throughput is infinite
    bad = [f"{name}={getattr(cfg, name)!r}" for name, ok in rules.items() if not ok]
    if bad:
        raise ValueError("invalid simulator configuration: " + ", ".join(bad))


class Engine:
    """One simulated GPU serving one model. Public state is read-only; change it only through
    ``submit``, ``cancel``, ``step``, ``advance_to`` and ``restart``.

    Invariants: ``now`` never decreases; every block is held by exactly one running sequence or is
    free (with prefix caching: a cached block may be held by several, and a free one may still be
    cached); waiting sequences hold no blocks; a sequence generates at most its cap of tokens.
    """

    def __init__(self, config: SimConfig, start_s: float = 0.0) -> None:
        validate_config(config)
        self.config = config
        self._rng = random.Random(config.seed)
        self._cache = PrefixCachingAllocator(config.kv_blocks) if config.prefix_caching else None
        self._alloc: PagedAllocator | ContiguousAllocator
        if self._cache is not None:
            self._alloc = self._cache
        elif config.mode == "paged":
            self._alloc = PagedAllocator(config.kv_blocks)
        else:
            self._alloc = ContiguousAllocator(config.kv_blocks)
        self._now = start_s
        self._ready_s = start_s + config.load_time_s
        self._next_id = 1
        self._running: list[_Seq] = []  # in start order: the last one is preempted first
        self._waiting: deque[_Seq] = deque()
        self._by_id: dict[int, _Seq] = {}
        self._oom_times: deque[float] = deque()
        self.stats = StatsRecorder(start_s, self._ready_s)

    # ---- state ---------------------------------------------------------------------------
    @property
    def now(self) -> float:
        return self._now

    def is_loading(self) -> bool:
        return self._now < self._ready_s

    @property
    def ready_at(self) -> float:
        return self._ready_s

    def has_work(self) -> bool:
        return bool(self._running) or bool(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def used_blocks(self) -> int:
        return self._alloc.used_blocks

    @property
    def context_tokens(self) -> int:
        """Longest prompt + output a single sequence can hold: the whole cache."""
        return self.config.kv_blocks * self.config.block_size

    def phase(self) -> Literal["loading", "warming", "ready"]:
        if self.is_loading():
            return "loading"
        return "warming" if self.step_multiplier() > 1.0 else "ready"

    def step_multiplier(self) -> float:
        """Warm-up slowdown at ``now``: ``slow_start_factor`` when loading ends, easing linearly
        to 1 over ``slow_start_s``."""
        cfg = self.config
        if cfg.slow_start_s <= 0.0:
            return 1.0
        progress = max(0.0, (self._now - self._ready_s) / cfg.slow_start_s)
        if progress >= 1.0:
            return 1.0
        return cfg.slow_start_factor + (1.0 - cfg.slow_start_factor) * progress

    def largest_free_blocks(self) -> int:
        return self._alloc.largest_free_blocks

    def free_blocks(self) -> int:
        """Blocks an allocation may take: with prefix caching, evictable cached ones included."""
        return self._alloc.free_blocks

    def evictable_blocks(self) -> int:
        """Free blocks that still hold cached prefixes (0 without prefix caching)."""
        return 0 if self._cache is None else self._cache.evictable_blocks

    def cached_held_blocks(self) -> int:
        """Cached blocks running sequences hold, each counted once however many share it."""
        return 0 if self._cache is None else self._cache.held_hashed_blocks

    def seq_cached_blocks(self, seq_id: int) -> int:
        """Blocks ``seq_id`` holds through the prefix cache (shareable; the rest are its own)."""
        return len(self._by_id[seq_id].cached)

    def prefix_hits(
        self, block_hashes: tuple[int, ...] | None, prompt_tokens: int
    ) -> tuple[int, int]:
        """The leading blocks a new request would find resident if admitted now, and how many of
        them are evictable (each needs a free block back; the others are held and cost none)."""
        if self._cache is None or block_hashes is None:
            return 0, 0
        return self._cache.lookup(block_hashes[: (prompt_tokens - 1) // self.config.block_size])

    def snapshot(self) -> EngineStats:
        """Counters and time-weighted figures at ``now`` (see ``EngineStats``)."""
        return self.stats.snapshot(
            now=self._now,
            phase=self.phase(),
            running=len(self._running),
            waiting=len(self._waiting),
            alloc=self._alloc,
            evictable_blocks=self.evictable_blocks(),
            block_size=self.config.block_size,
            kv_bytes_per_token=self.config.kv_bytes_per_token,
        )

    # ---- requests ------------------------------------------------------------------------
    def output_cap(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """Most tokens a request may generate; ``ContextTooLong`` when it can never fit.

        Like vLLM with max_model_len equal to the cache: an explicit ``max_tokens`` must fit
        with the prompt; without one, the default is shortened to what fits."""
        context = self.context_tokens
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
            if prompt_tokens + max_tokens > context:
                raise ContextTooLong(context, prompt_tokens, max_tokens)
            return max_tokens
        cap = min(self.config.default_output_tokens, context - prompt_tokens)
        if cap < 1:
            raise ContextTooLong(context, prompt_tokens, 1)
        return cap

    def submit(
        self,
        prompt_tokens: int,
        max_tokens: int | None,
        output_tokens: int | None,
        block_hashes: tuple[int, ...] | None = None,
    ) -> int:
        """Queue a request at ``now`` and return its sequence id.

        ``output_tokens`` (the ``sim_output_tokens`` vendor field) fixes the output length,
        capped at the request's cap; otherwise it is drawn lognormal with mean
        ``output_mean_ratio * cap`` and log-sigma ``output_sigma``, capped, at least 1.
        ``block_hashes`` are the chained hashes of the prompt's full blocks (``gateway.sim.wire``);
        with prefix caching on they let it share resident blocks (None: it does not cache; hashes
        beyond the prompt's full blocks are ignored).
        Raises ``EngineLoading``, ``ContextTooLong`` or ``ValueError`` (prompt_tokens < 1)."""
        if self.is_loading():
            raise EngineLoading(self._ready_s - self._now)
        if prompt_tokens < 1:
            raise ValueError(f"a prompt needs at least one token, got {prompt_tokens}")
        cap = self.output_cap(prompt_tokens, max_tokens)
        if output_tokens is not None:
            target = max(1, min(output_tokens, cap))
        else:
            sigma = self.config.output_sigma
            mean = self.config.output_mean_ratio * cap
            draw = self._rng.lognormvariate(math.log(mean) - sigma * sigma / 2.0, sigma)
            target = max(1, min(cap, round(draw)))
        if not self.has_work():
            self.stats.work_arrived(self._now)
        chain = None
        if self._cache is not None and block_hashes is not None:
            chain = list(block_hashes[: prompt_tokens // self.config.block_size])
        seq = _Seq(self._next_id, prompt_tokens, cap, target, chain)
        self._next_id += 1
        self._by_id[seq.seq_id] = seq
        self._waiting.append(seq)
        self.stats.submitted += 1
        return seq.seq_id

    def cancel(self, seq_id: int) -> bool:
        """Drop a request (its client went away) and free its blocks; False if it is not here."""
        seq = self._by_id.get(seq_id)
        if seq is None:
            return False
        if seq in self._waiting:
            self._waiting.remove(seq)
        else:
            self._running.remove(seq)
            self._release(seq)
        self._forget(seq)
        self.stats.cancelled += 1
        if not self.has_work():
            self.stats.went_idle(self._now)
        return True

    def advance_to(self, t: float) -> None:
        """Move an idle engine's clock forward (no-op if ``t <= now``)."""
        if self.has_work():
            raise RuntimeError("only an idle engine may skip time; step() moves a busy one")
        self._now = max(self._now, t)

    def restart(self, load_time_s: float | None = None) -> list[Failure]:
        """Reload now, as after a crash: every request in flight fails, then the engine loads for
        ``load_time_s`` (default: the configured one)."""
        failed = self._fail_all("restart", "the server restarted")
        self.stats.restarts += 1
        self._begin_loading(load_time_s)
        return failed

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Run one step from ``now``; ``now`` becomes its end. Requires work and not loading."""
        if self.is_loading() or not self.has_work():
            raise RuntimeError("step() needs a ready engine with work")
        start = self._now
        failed: list[Failure] = []
        decoding = [seq for seq in self._running if seq.kv_tokens >= seq.needed]
        budget = self.config.max_num_batched_tokens or math.inf
        if isinstance(self._alloc, PagedAllocator):
            preempted = self._grow_paged(self._alloc)
            decoding = [seq for seq in decoding if seq.blocks > 0]  # the preempted are gone
            if not preempted:
                self._admit_paged(self._alloc)
        else:
            self._admit_contiguous(self._alloc, failed)
        running = self._running
        batch = len(running)
        if batch == 0:  # every admission failed (contiguous OOM or crash): no pass ran
            if not self.has_work() and not self.is_loading():
                self.stats.went_idle(start)
            return StepResult(start, 0.0, 0, [], [], failed)
        prefill = self._prefill_chunks(max(0.0, budget - len(decoding)))
        cfg = self.config
        attended = sum(seq.kv_tokens + 1 for seq in decoding)
        duration = (
            cfg.decode_step_s
            + cfg.step_per_seq_s * batch
            + cfg.attend_s_per_token * attended
            + prefill / cfg.prefill_tokens_per_s
        ) * self.step_multiplier()
        # the decoding sequences write one more token's K and V during this step
        self.stats.kv_tokens += len(decoding)
        self.stats.ran_step(duration, batch, prefill, self._alloc.used_blocks)
        tokens: list[int] = []
        finished: list[tuple[int, FinishReason]] = []
        keep: list[_Seq] = []
        was_decoding = {seq.seq_id for seq in decoding}
        for seq in running:
            if seq.seq_id in was_decoding:
                seq.kv_tokens += 1
                if seq.chain is not None:
                    self._cache_full_blocks(seq)
            elif seq.kv_tokens < seq.needed:  # still prefilling: no token yet
                keep.append(seq)
                continue
            seq.generated += 1
            tokens.append(seq.seq_id)
            if seq.generated >= seq.target:
                finished.append((seq.seq_id, "length" if seq.generated >= seq.cap else "stop"))
                self._release(seq)
                self._forget(seq)
            else:
                keep.append(seq)
        self._running = keep
        self.stats.finished += len(finished)
        self._now = start + duration
        if not self.has_work():
            self.stats.went_idle(self._now)
        return StepResult(start, duration, prefill, tokens, finished, failed)

    def _prefill_chunks(self, budget: float) -> int:
        """Prefill the sequences that need it, oldest first, within ``budget`` tokens; returns
        the tokens prefilled."""
        done = 0
        for seq in self._running:
            if budget <= 0:
                break
            chunk = int(min(seq.needed - seq.kv_tokens, budget))
            if chunk > 0:
                seq.kv_tokens += chunk
                self.stats.kv_tokens += chunk
                budget -= chunk
                done += chunk
                if seq.chain is not None:
                    self._cache_full_blocks(seq)
        return done

    def _cache_full_blocks(self, seq: _Seq) -> None:
        """Offer the prefix cache each block ``seq`` has filled since the last call."""
        cache = self._cache
        if cache is None or seq.chain is None:
            return
        chain = seq.chain
        while seq.full < seq.kv_tokens // self.config.block_size:
            if seq.full == len(chain):  # past the prompt's hashes: a hash only seq can match
                chain.append(hash(("own block", seq.seq_id, seq.full)))
            if cache.register(chain[seq.full]):
                seq.cached.append(chain[seq.full])
            seq.full += 1

    def _grow_paged(self, pool: PagedAllocator) -> bool:
        """Give each decoding sequence room for its next token, preempting the most recently
        started ones when no block is free; True if any was preempted. No admission follows in
        a step that preempted (as vLLM), so a victim is not readmitted only to be preempted
        again."""
        bs = self.config.block_size
        running = self._running
        preempted = False
        i = 0
        while i < len(running):
            seq = running[i]
            if seq.kv_tokens == seq.blocks * bs:  # the next token opens a new block
                while pool.free_blocks == 0 and running[-1] is not seq:
                    self._preempt(running.pop())
                    preempted = True
                if not pool.take(1):  # seq is the newest and nothing is free: it yields
                    running.pop()
                    self._preempt(seq)
                    preempted = True
                    break
                seq.blocks += 1
            i += 1
        return preempted

    def _admit_paged(self, pool: PagedAllocator) -> None:
        """Admit waiting sequences FIFO while the blocks of their whole prompt are free (a
        preempted one recomputes its output too; with prefix caching, not its resident
        blocks)."""
        bs = self.config.block_size
        waiting = self._waiting
        limit = self.config.max_num_seqs
        cache = self._cache
        while waiting and len(self._running) < limit:
            seq = waiting[0]
            tokens = seq.prompt + seq.generated
            blocks = -(-tokens // bs)
            if cache is None or seq.chain is None:
                if not pool.take(blocks):
                    break
                waiting.popleft()
                self._start(seq, tokens)
            else:
                hits, _ = cache.lookup(seq.chain[: (tokens - 1) // bs])
                hit = seq.chain[:hits]
                shared = cache.take_with_prefix(hit, blocks - hits)
                if shared is None:
                    break
                waiting.popleft()
                seq.cached = hit
                seq.full = hits
                self._start(seq, tokens, computed=hits * bs, shared=shared * bs)
                if not seq.preempted:  # vLLM counts a preempted request's lookups apart
                    self.stats.prefix_cache_queries += seq.prompt
                    self.stats.prefix_cache_hits += hits * bs
            seq.blocks = blocks

    def _admit_contiguous(self, regions: ContiguousAllocator, failed: list[Failure]) -> None:
        """Start waiting requests FIFO while fewer than max_num_seqs run, each in one first-fit
        region of prompt + cap tokens; a request with no region large enough fails (OOM) at once,
        and too many OOMs crash the engine."""
        cfg = self.config
        waiting = self._waiting
        while waiting and len(self._running) < cfg.max_num_seqs:
            seq = waiting.popleft()
            blocks = -(-(seq.prompt + seq.cap) // cfg.block_size)
            start = regions.allocate(blocks)
            if start is None:
                failed.append(Failure(seq.seq_id, "oom", self._oom_message(blocks, regions)))
                self._forget(seq)
                self.stats.oom_errors += 1
                self.stats.failed += 1
                if self._oom_crashes():
                    failed.extend(self._fail_all("crash", "the engine crashed (CUDA OOM)"))
                    self.stats.crashes += 1
                    self._begin_loading()
                    return
                continue
            seq.region = start
            self._start(seq, seq.prompt)

    # ---- helpers -------------------------------------------------------------------------
    def _start(self, seq: _Seq, needed: int, computed: int = 0, shared: int = 0) -> None:
        """Admit ``seq``: it holds its memory from now and prefills ``needed`` tokens, of which
        ``computed`` are in cached blocks already, ``shared`` of those held by others too."""
        if seq.generated == 0:  # not a preempted sequence coming back
            self.stats.prompt_tokens += seq.prompt
        seq.kv_tokens = computed
        self.stats.kv_tokens += computed - shared
        seq.needed = needed
        self._running.append(seq)
        self.stats.max_running = max(self.stats.max_running, len(self._running))

    def _preempt(self, seq: _Seq) -> None:
        self._release(seq)
        seq.preempted = True
        self._waiting.appendleft(seq)
        self.stats.preemptions += 1

    def _release(self, seq: _Seq) -> None:
        self.stats.kv_tokens -= seq.kv_tokens
        if self._cache is not None:
            still = self._cache.release(seq.cached, seq.blocks - len(seq.cached))
            self.stats.kv_tokens += still * self.config.block_size  # others hold those tokens
            seq.cached = []
            seq.full = 0
            seq.blocks = 0
        elif isinstance(self._alloc, PagedAllocator):
            self._alloc.give_back(seq.blocks)
            seq.blocks = 0
        else:
            self._alloc.release(seq.region)
            seq.region = -1
        seq.kv_tokens = 0

    def _forget(self, seq: _Seq) -> None:
        del self._by_id[seq.seq_id]

    def _fail_all(self, kind: FailureKind, message: str) -> list[Failure]:
        failed = [Failure(s.seq_id, kind, message) for s in (*self._running, *self._waiting)]
        self.stats.kv_tokens = 0
        self._running = []
        self._waiting.clear()
        self._by_id.clear()
        self._alloc.reset()
        self.stats.failed += len(failed)
        return failed

    def _begin_loading(self, load_time_s: float | None = None) -> None:
        load = self.config.load_time_s if load_time_s is None else load_time_s
        if load < 0:
            raise ValueError(f"load_time_s must be >= 0, got {load}")
        self._ready_s = self._now + load
        self._oom_times.clear()
        self.stats.began_loading(self._now, self._ready_s)

    def _oom_crashes(self) -> bool:
        limit = self.config.oom_crash_after
        if limit <= 0:
            return False
        times = self._oom_times
        times.append(self._now)
        while times[0] <= self._now - OOM_WINDOW_S:
            times.popleft()
        return len(times) >= limit

    def _oom_message(self, blocks: int, regions: ContiguousAllocator) -> str:
        per_block = self.config.block_size * self.config.kv_bytes_per_token
        return (
            f"CUDA out of memory. Tried to allocate {blocks * per_block / MIB:.2f} MiB "
            f"({regions.free_blocks * per_block / MIB:.2f} MiB of KV cache free, largest "
            f"contiguous free block {regions.largest_free_blocks * per_block / MIB:.2f} MiB)"
        )
