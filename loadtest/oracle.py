"""A clairvoyant scheduler on the simulator's own engine: it knows every request's true output
length, when the backend will restart, and never lets the engine preempt. It is a real schedule
(its goodput is achieved, in simulated time, with no network or gateway in the way), so the
true optimum lies between it and the LP bound (``loadtest.bound``).

Its rules: a request waits in the oracle's queue until it is admitted or can no longer meet
its SLO. At every step it admits, densest first (fewest KV blocks held per token it makes,
``prompt + output / 2``), each request whose admission keeps the engine's future block use
within the cache at every step to come (paged: the running set's known growth curves;
contiguous: a first-fit region of prompt + output, with max_tokens set to the true output) and
whose estimated finish meets its deadline (and comes before a known restart).

``as_sent=True`` keeps every rule but one: a contiguous engine allocates prompt + the request's
own ``max_tokens``, as it does for any gateway that forwards the request unchanged. The gap
between the two is what knowing output lengths is worth on a contiguous backend, which no
admission rule can take back (only rewriting ``max_tokens`` could).

With prefix caching the engine shares cached blocks by itself; the fit check counts the cached
blocks running sequences hold once, and a new request's hits on blocks held now as free, but
every other block, a cached block a sharer may let go of included, as if it were still held:
it over-estimates memory, so the oracle still never makes the engine preempt. Its time
estimates still charge the whole prompt's prefill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.sim.config import SimConfig
from gateway.sim.engine import Engine
from loadtest.generator import PlannedRequest, block_hashes
from loadtest.scenario import Scenario


@dataclass(frozen=True, slots=True)
class OracleResult:
    tokens: int  # output tokens of requests that met their SLO
    tokens_per_s: float  # over the horizon
    within_slo: int
    requests: int
    preemptions: int
    served: frozenset[int] = frozenset()  # ids of the requests that met their SLO


@dataclass(slots=True)
class _Live:
    req: PlannedRequest
    generated: int = 0
    first_s: float | None = None  # simulated time of its first token


def _fits_paged(
    engine: Engine,
    live: dict[int, _Live],
    extra: PlannedRequest,
    extra_hashes: tuple[int, ...] | None,
) -> bool:
    """Whether the running set plus ``extra``, each growing one token per step until done,
    stays within the cache at every future step. Use only rises between finishes, so checking
    just before each finish is enough. Cached blocks held now are counted once, for the whole
    future: every other block a sequence holds, or will, is its own."""
    cfg = engine.config
    items = list(live.items())
    prompts = np.array(
        [x.req.prompt_tokens + x.generated for _, x in items] + [extra.prompt_tokens]
    )
    left = np.array([x.req.output_tokens - x.generated for _, x in items] + [extra.output_tokens])
    checks = left - 1
    bs = cfg.block_size
    # blocks of seq i at step n (from now) is ceil((kv_i + n) / bs) while n < left_i
    blocks = -(-(prompts[None, :] + checks[:, None]) // bs)
    cached_held = 0
    if cfg.prefix_caching:
        resident, evictable = engine.prefix_hits(extra_hashes, extra.prompt_tokens)
        cached = [engine.seq_cached_blocks(seq) for seq, _ in items] + [resident - evictable]
        blocks = blocks - np.array(cached)[None, :]
        cached_held = engine.cached_held_blocks()
    held = np.where(checks[:, None] < left[None, :], blocks, 0)
    return bool(held.sum(axis=1).max() + cached_held <= cfg.kv_blocks)


def _step_estimate(cfg: SimConfig, engine: Engine, batch: int, last: float) -> float:
    base = cfg.decode_step_s + cfg.step_per_seq_s * batch
    return max(last, base * engine.step_multiplier())


def clairvoyant(
    scenario: Scenario, planned: Sequence[PlannedRequest], *, as_sent: bool = False
) -> OracleResult:
    cfg = scenario.backend
    ts = cfg.time_scale
    horizon = scenario.duration_s + scenario.drain_timeout_s
    ready_before = scenario.backend_wait == "ready"
    engine = Engine(cfg, start_s=-cfg.load_time_s if ready_before else 0.0)
    slos = {name: t.slo for name, t in scenario.tenants.items()}
    hashes = {req.id: block_hashes(scenario, req) for req in planned}
    order = sorted(planned, key=lambda p: p.at_s)
    restart_at = None if scenario.restart_at_s is None else scenario.restart_at_s * ts
    live: dict[int, _Live] = {}
    queue: list[PlannedRequest] = []
    good = 0
    good_tokens = 0
    served: set[int] = set()
    last_step = cfg.decode_step_s
    nxt = 0
    end = horizon * ts

    def cap(req: PlannedRequest) -> int:
        """The max_tokens the engine is sent (a contiguous one allocates prompt + it)."""
        return req.max_tokens if as_sent and cfg.mode != "paged" else req.output_tokens

    def deadline(req: PlannedRequest) -> float:
        return (req.at_s + slos[req.tenant].latency_s) * ts

    def admit() -> None:
        nonlocal queue
        batch = len(live)
        step = _step_estimate(cfg, engine, batch + 1, last_step)
        keep: list[PlannedRequest] = []
        ranked = sorted(queue, key=lambda r: r.prompt_tokens + r.output_tokens / 2.0)
        placed_contiguous = False
        for req in ranked:
            slo = slos[req.tenant]
            prefill = req.prompt_tokens / cfg.prefill_tokens_per_s
            finish = engine.now + prefill + req.output_tokens * step
            first_by = (req.at_s + slo.ttft_s) * ts
            if finish > deadline(req) or (req.stream and engine.now + prefill + step > first_by):
                keep.append(req)  # perhaps later, with a smaller batch
                continue
            if restart_at is not None and engine.now < restart_at < finish:
                keep.append(req)
                continue
            if len(live) >= cfg.max_num_seqs:
                keep.append(req)
                continue
            if cfg.mode == "paged":
                if not _fits_paged(engine, live, req, hashes[req.id]):
                    keep.append(req)
                    continue
            else:
                need = -(-(req.prompt_tokens + cap(req)) // cfg.block_size)
                # one per step: the engine places regions at the next step, first fit
                if placed_contiguous or engine.largest_free_blocks() < need:
                    keep.append(req)
                    continue
                placed_contiguous = True
            seq = engine.submit(req.prompt_tokens, cap(req), req.output_tokens, hashes[req.id])
            live[seq] = _Live(req)
        queue = keep

    while engine.now < end:
        while nxt < len(order) and order[nxt].at_s * ts <= engine.now:
            queue.append(order[nxt])
            nxt += 1
        if restart_at is not None and engine.now >= restart_at:
            engine.restart()
            live.clear()
            restart_at = None
        # a request that cannot finish even alone from now is gone
        floor_step = cfg.decode_step_s + cfg.step_per_seq_s
        queue = [r for r in queue if engine.now + r.output_tokens * floor_step <= deadline(r)]
        if not engine.is_loading():
            admit()
        if engine.has_work():
            result = engine.step()
            if result.duration_s > 0:
                last_step = result.duration_s
            at = result.start_s + result.duration_s
            for seq_id in result.tokens:
                item = live[seq_id]
                item.generated += 1
                if item.first_s is None:
                    item.first_s = at
            for seq_id, _ in result.finished:
                item = live.pop(seq_id)
                slo = slos[item.req.tenant]
                latency = at / ts - item.req.at_s
                ttft = (item.first_s or at) / ts - item.req.at_s
                ok = latency <= slo.latency_s and (not item.req.stream or ttft <= slo.ttft_s)
                if ok and at <= end:
                    good += 1
                    good_tokens += item.req.output_tokens
                    served.add(item.req.id)
            continue
        events = [end]
        if nxt < len(order):
            events.append(order[nxt].at_s * ts)
        if engine.is_loading():
            events.append(engine.ready_at)
        if restart_at is not None:
            events.append(restart_at)
        if not engine.is_loading() and queue:
            # nothing runs, yet nothing queued could be admitted: retry a little later
            events.append(engine.now + cfg.decode_step_s)
        engine.advance_to(max(engine.now + 1e-9, min(events)))
    preemptions = engine.stats.preemptions
    return OracleResult(
        good_tokens, good_tokens / horizon, good, len(planned), preemptions, frozenset(served)
    )
