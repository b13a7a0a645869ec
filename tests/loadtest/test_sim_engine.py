"""The simulated GPU's pure parts: allocators, engine scheduling, step time, warm-up, crash,
fragmentation, stats, prompt counting and the throughput ceiling. Simulated time only."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sim.allocator import ContiguousAllocator, PagedAllocator, fragmentation_ratio
from gateway.sim.config import SimConfig
from gateway.sim.engine import (
    ContextTooLong,
    Engine,
    EngineLoading,
    StepResult,
    validate_config,
)
from gateway.sim.wire import WireError, count_prompt_tokens, decode_request
from loadtest.ceiling import ceiling, ceiling_tokens_per_s


def run_until_idle(engine: Engine, max_steps: int = 100_000) -> list[StepResult]:
    results = []
    while engine.has_work():
        results.append(engine.step())
        assert len(results) < max_steps
    return results


# ---- allocators ------------------------------------------------------------------------------


def test_paged_allocator_is_all_or_nothing() -> None:
    pool = PagedAllocator(4)
    assert pool.take(3)
    assert not pool.take(2)
    assert pool.free_blocks == 1
    pool.give_back(3)
    assert pool.free_blocks == pool.largest_free_blocks == 4
    with pytest.raises(ValueError, match="would leave 5 free"):
        pool.give_back(1)


def test_contiguous_allocator_first_fit_and_merge() -> None:
    regions = ContiguousAllocator(10)
    a, b, c = regions.allocate(3), regions.allocate(4), regions.allocate(3)
    assert (a, b, c) == (0, 3, 7)
    assert regions.allocate(1) is None
    regions.release(0)
    regions.release(7)
    assert regions.free_regions() == [(0, 3), (7, 3)]
    assert regions.allocate(4) is None  # 6 blocks free, no region of 4
    regions.release(3)
    assert regions.free_regions() == [(0, 10)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=60))
def test_contiguous_allocator_matches_a_block_map(ops: list[tuple[bool, int]]) -> None:
    """Differential: a bytearray of used blocks with a naive first-fit scan is the reference."""
    total = 32
    regions = ContiguousAllocator(total)
    used = bytearray(total)
    live: list[tuple[int, int]] = []
    for allocate, n in ops:
        if allocate or not live:
            expected = next((s for s in range(total - n + 1) if not any(used[s : s + n])), None)
            got = regions.allocate(n)
            assert got == expected
            if got is not None:
                used[got : got + n] = b"\x01" * n
                live.append((got, n))
        else:
            start, length = live.pop(n % len(live))
            regions.release(start)
            used[start : start + length] = bytes(length)
        runs = [len(r) for r in bytes(used).split(b"\x01") if r]
        assert regions.free_blocks == used.count(0)
        assert regions.largest_free_blocks == max(runs, default=0)
        starts = [s for s, _ in regions.free_regions()]
        assert starts == sorted(starts)


def test_fragmentation_ratio_definition() -> None:
    assert fragmentation_ratio(0, 0) == 0.0
    assert fragmentation_ratio(6, 3) == pytest.approx(0.5)
    assert fragmentation_ratio(8, 8) == 0.0


# ---- step time -------------------------------------------------------------------------------


def test_step_time_is_decode_plus_per_sequence_plus_prefill() -> None:
    cfg = SimConfig(decode_step_s=0.02, step_per_seq_s=0.001, prefill_tokens_per_s=1000.0)
    engine = Engine(cfg)
    for _ in range(3):
        engine.submit(100, 10, 5)
    first = engine.step()
    assert first.prefill_tokens == 300
    assert first.duration_s == pytest.approx(0.02 + 3 * 0.001 + 300 / 1000)
    assert first.tokens == [1, 2, 3]
    second = engine.step()
    assert second.start_s == pytest.approx(first.duration_s)
    assert second.duration_s == pytest.approx(0.02 + 3 * 0.001)
    assert engine.now == pytest.approx(first.duration_s + second.duration_s)


def test_warm_up_loads_then_eases_step_time_to_normal() -> None:
    cfg = SimConfig(
        load_time_s=2.0,
        slow_start_s=4.0,
        slow_start_factor=3.0,
        step_per_seq_s=0.0,
        prefill_tokens_per_s=1e12,
    )
    engine = Engine(cfg)
    assert engine.phase() == "loading"
    with pytest.raises(EngineLoading) as info:
        engine.submit(10, 5, 1)
    assert info.value.remaining_s == pytest.approx(2.0)
    for at, factor in ((2.0, 3.0), (4.0, 2.0), (5.0, 1.5), (6.0, 1.0), (9.0, 1.0)):
        engine.advance_to(at)
        assert engine.phase() == ("ready" if factor == 1.0 else "warming")
        engine.submit(10, 5, 1)
        assert engine.step().duration_s == pytest.approx(cfg.decode_step_s * factor)


# ---- paged mode ------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    block_size=st.integers(1, 16),
    prompts=st.lists(st.integers(1, 40), min_size=2, max_size=8),
    spare_blocks=st.integers(0, 12),
)
def test_paged_preempts_exactly_when_blocks_run_out(
    block_size: int, prompts: list[int], spare_blocks: int
) -> None:
    """All prompts start in step 1; after step k a sequence holds ceil((P + k - 1) / bs) blocks.
    The first preemption is in the first step whose demand exceeds the cache, not a step
    earlier, and until then the blocks held are exactly that demand."""
    kv_blocks = sum(-(-p // block_size) for p in prompts) + spare_blocks
    cfg = SimConfig(kv_blocks=kv_blocks, block_size=block_size, max_num_seqs=len(prompts))
    engine = Engine(cfg)
    capacity = kv_blocks * block_size
    for p in prompts:
        engine.submit(p, capacity - p, capacity - p)
    for step in range(1, capacity + 1):
        demand = sum(-(-(p + step - 1) // block_size) for p in prompts)
        if engine.step().finished:  # a tiny cache's outputs can end before it runs out
            return
        if demand > kv_blocks:
            assert engine.snapshot().preemptions >= 1
            return
        assert engine.snapshot().preemptions == 0
        assert engine.used_blocks == demand
    pytest.fail("the cache never ran out")


def test_preempted_sequence_goes_first_and_recomputes_its_output() -> None:
    cfg = SimConfig(kv_blocks=4, block_size=4, max_num_seqs=8, prefill_tokens_per_s=1e12)
    engine = Engine(cfg)
    a, b, c = (engine.submit(4, 8, 8) for _ in range(3))
    engine.step()  # a, b, c admitted with one block each; one block free
    assert (engine.num_running, engine.used_blocks) == (3, 3)
    result = engine.step()  # all need a 2nd block: a takes the free one, c yields its own to b
    assert result.tokens == [a, b]
    assert (engine.snapshot().preemptions, engine.num_waiting) == (1, 1)
    for _ in range(3):
        engine.step()  # a and b fill their 2nd blocks (8 tokens each)
    assert engine.step().tokens == [a]  # a needs a 3rd block: b, the newest, is preempted
    assert engine.num_waiting == 2
    counts = {a: 6, b: 5, c: 1}
    readmissions: list[tuple[int, int]] = []
    for result in run_until_idle(engine):
        for seq_id in result.tokens:
            counts[seq_id] += 1
        if result.prefill_tokens:
            readmissions.append((result.tokens[0], result.prefill_tokens))
    assert counts == {a: 8, b: 8, c: 8}  # no token twice, none lost
    # the later victim went to the front; each recomputes its prompt and the output it had sent
    assert readmissions == [(b, 4 + 5), (c, 4 + 1)]


def test_paged_rejects_what_can_never_fit() -> None:
    engine = Engine(SimConfig(kv_blocks=4, block_size=4, default_output_tokens=10))
    with pytest.raises(ContextTooLong, match="maximum context length is 16 tokens"):
        engine.submit(17, None, None)
    with pytest.raises(ContextTooLong):
        engine.submit(10, 7, None)
    assert engine.output_cap(10, None) == 6  # the default is shortened to what fits
    assert engine.output_cap(10, 6) == 6


def test_paged_fragmentation_is_zero_and_largest_free_is_all_free() -> None:
    engine = Engine(SimConfig(kv_blocks=8, block_size=4, kv_bytes_per_token=100))
    engine.submit(9, 3, 3)
    engine.step()
    stats = engine.snapshot()
    assert stats.free_blocks == 5
    assert stats.fragmentation_ratio == 0.0
    assert stats.largest_free_block_bytes == 5 * 4 * 100


def test_cancel_frees_blocks_waiting_or_running() -> None:
    engine = Engine(SimConfig(kv_blocks=8, block_size=4, max_num_seqs=1))
    running = engine.submit(9, 3, 3)
    waiting = engine.submit(9, 3, 3)
    engine.step()
    assert engine.used_blocks == 3
    assert engine.cancel(waiting)
    assert engine.cancel(running)
    assert not engine.cancel(running)
    assert engine.used_blocks == 0
    assert not engine.has_work()


def test_output_lengths_are_seeded_capped_and_honour_sim_output_tokens() -> None:
    def lengths(seed: int) -> list[int]:
        engine = Engine(SimConfig(seed=seed, kv_blocks=100_000, max_num_seqs=1000))
        ids = [engine.submit(10, 100, None) for _ in range(300)]
        counts = dict.fromkeys(ids, 0)
        for result in run_until_idle(engine):
            for seq_id in result.tokens:
                counts[seq_id] += 1
        return [counts[i] for i in ids]

    first = lengths(7)
    assert first == lengths(7)
    assert first != lengths(8)
    assert all(1 <= n <= 100 for n in first)
    engine = Engine(SimConfig())
    engine.submit(10, 5, 50)
    results = run_until_idle(engine)
    assert len(results) == 5
    assert results[-1].finished == [(1, "length")]


# ---- contiguous mode -------------------------------------------------------------------------


def fragmented_contiguous(**overrides: float) -> tuple[Engine, int]:
    """10 one-token blocks holding A [0,3) B [3,7) C [7,10); A and C finish after step 1, leaving
    6 free blocks in two regions of 3. Returns the engine and B's id."""
    cfg = msgspec.structs.replace(
        SimConfig(mode="contiguous", kv_blocks=10, block_size=1, kv_bytes_per_token=1 << 20),
        **overrides,
    )
    engine = Engine(cfg)
    engine.advance_to(engine.ready_at)
    engine.submit(1, 2, 1)
    b = engine.submit(1, 3, 3)
    engine.submit(1, 2, 1)
    engine.step()
    return engine, b


def test_contiguous_oom_on_fragmented_cache_with_enough_free_blocks() -> None:
    engine, b = fragmented_contiguous()
    stats = engine.snapshot()
    assert stats.free_blocks == 6
    assert stats.fragmentation_ratio == pytest.approx(0.5)
    assert stats.largest_free_block_bytes == 3 << 20
    d = engine.submit(1, 3, 1)  # needs 4 contiguous blocks
    result = engine.step()
    assert [f.seq_id for f in result.failed] == [d]
    assert result.failed[0].kind == "oom"
    assert result.failed[0].message.startswith("CUDA out of memory. Tried to allocate 4.00 MiB")
    assert result.tokens == [b]
    e = engine.submit(1, 2, 1)  # 3 blocks fit the first free region
    result = engine.step()
    assert (result.failed, result.tokens) == ([], [b, e])
    assert engine.snapshot().oom_errors == 1


def test_contiguous_requests_beyond_max_num_seqs_wait_fifo() -> None:
    engine = Engine(SimConfig(mode="contiguous", kv_blocks=100, block_size=1, max_num_seqs=2))
    ids = [engine.submit(1, 2, 2) for _ in range(3)]
    assert engine.step().tokens == ids[:2]
    assert engine.num_waiting == 1
    engine.step()
    assert engine.step().tokens == ids[2:]


def test_repeated_ooms_crash_every_request_then_reload() -> None:
    engine, b = fragmented_contiguous(oom_crash_after=2, load_time_s=5.0)
    engine.submit(1, 3, 1)
    assert engine.step().failed[0].kind == "oom"
    queued = [engine.submit(1, 3, 1), engine.submit(1, 1, 1)]
    result = engine.step()
    assert [(f.seq_id, f.kind) for f in result.failed] == [
        (queued[0], "oom"),
        (b, "crash"),
        (queued[1], "crash"),
    ]
    assert result.duration_s == 0.0
    assert engine.is_loading()
    assert not engine.has_work()
    assert engine.used_blocks == 0
    with pytest.raises(EngineLoading):
        engine.submit(1, 1, 1)
    engine.advance_to(engine.now + 5.0)
    assert engine.phase() == "ready"
    stats = engine.snapshot()
    assert (stats.crashes, stats.oom_errors, stats.failed) == (1, 2, 4)
    assert engine.stats.since_restart().oom_errors == 0  # the new process counts from zero


def test_ooms_further_apart_than_the_window_do_not_crash() -> None:
    engine, _ = fragmented_contiguous(oom_crash_after=2, decode_step_s=6.0)
    engine.submit(1, 3, 1)
    engine.step()
    engine.step()  # B's last token; 12 s have passed since the first OOM
    engine.submit(1, 8, 1)
    engine.submit(1, 9, 1)
    assert [f.kind for f in engine.step().failed] == ["oom"]
    assert engine.snapshot().crashes == 0


def test_restart_fails_everything_in_flight() -> None:
    engine = Engine(SimConfig(load_time_s=1.0))
    engine.advance_to(1.0)
    ids = [engine.submit(10, 5, 5) for _ in range(3)]
    engine.step()
    assert sorted(f.seq_id for f in engine.restart()) == ids
    assert engine.is_loading()
    assert engine.used_blocks == 0


# ---- stats -----------------------------------------------------------------------------------


def test_time_accounting_and_kv_utilisation() -> None:
    cfg = SimConfig(
        kv_blocks=10,
        block_size=4,
        load_time_s=1.0,
        decode_step_s=0.5,
        step_per_seq_s=0.0,
        prefill_tokens_per_s=1e12,
    )
    engine = Engine(cfg)
    engine.advance_to(2.0)  # 1 s loading, 1 s idle
    engine.submit(8, 2, 2)  # 2 blocks, then a 3rd for its 9th token
    run_until_idle(engine)  # 2 steps: 0.5 s at 2 blocks, 0.5 s at 3
    engine.advance_to(4.0)
    stats = engine.snapshot()
    assert (stats.loading_s, stats.busy_s, stats.idle_s) == pytest.approx((1.0, 1.0, 2.0))
    assert stats.kv_utilisation_avg == pytest.approx((0.5 * 2 + 0.5 * 3) / 10 / 3.0)
    assert stats.kv_filled_avg == pytest.approx((0.5 * 8 + 0.5 * 9) / 40 / 3.0)
    assert (stats.generated_tokens, stats.prompt_tokens, stats.max_running) == (2, 8, 1)
    assert stats.idle_gaps == 1
    assert stats.longest_idle_gap_s == pytest.approx(1.0)


def test_invalid_config_names_the_fields() -> None:
    with pytest.raises(ValueError, match=r"kv_blocks=0, time_scale=-1.0"):
        validate_config(SimConfig(kv_blocks=0, time_scale=-1.0))


# ---- prompt tokens ---------------------------------------------------------------------------


def test_prompt_tokens_counted_from_text() -> None:
    chat = decode_request(
        "chat",
        b'{"model": "m", "messages": [{"role": "system", "content": "abcde"},'
        b'{"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]},'
        b'{"role": "assistant", "content": null}]}',
    )
    assert count_prompt_tokens(chat, 4.0) == (2 + 4) + (1 + 4) + (0 + 4) + 3
    text = decode_request("completion", b'{"model": "m", "prompt": "abcdefghi"}')
    assert count_prompt_tokens(text, 4.0) == 3
    ids = decode_request("completion", b'{"model": "m", "prompt": [1, 2, 3, 4, 5]}')
    assert count_prompt_tokens(ids, 4.0) == 5
    nested = decode_request("completion", b'{"model": "m", "prompt": [[1, 2]]}')
    assert count_prompt_tokens(nested, 4.0) == 2
    batch = decode_request("completion", b'{"model": "m", "prompt": ["a", "b"]}')
    with pytest.raises(WireError, match="one prompt per request"):
        count_prompt_tokens(batch, 4.0)


def test_requests_the_simulator_refuses() -> None:
    with pytest.raises(WireError, match="n=1 only"):
        decode_request("chat", b'{"model": "m", "messages": [], "n": 2}')
    with pytest.raises(WireError, match="at least 1"):
        decode_request("chat", b'{"model": "m", "messages": [], "max_completion_tokens": 0}')
    with pytest.raises(WireError, match="invalid request body"):
        decode_request("completion", b'{"model": "m"}')


# ---- ceiling ---------------------------------------------------------------------------------


def throughput_under_overload(cfg: SimConfig, prompt: int, output: int, reserve: int) -> float:
    """Output tokens per simulated second while the engine never runs out of waiting work."""
    engine = Engine(cfg)
    for _ in range(3000):
        engine.submit(prompt, reserve, output)
    while engine.num_waiting:
        engine.step()
    stats = engine.snapshot()
    return stats.generated_tokens / stats.busy_s


@pytest.mark.parametrize(
    ("mode", "kv_blocks", "max_num_seqs", "prompt", "output", "reserve"),
    [
        ("paged", 2048, 256, 200, 128, 256),  # memory-bound, preempting
        ("paged", 2048, 256, 1000, 300, 400),  # long prompts: prefill-heavy
        ("paged", 4096, 256, 100, 50, 100),  # max_num_seqs-bound
        ("contiguous", 2048, 64, 200, 128, 256),  # reservation fits: waits, never OOMs
    ],
)
def test_overloaded_engine_approaches_but_never_beats_the_ceiling(
    mode: str, kv_blocks: int, max_num_seqs: int, prompt: int, output: int, reserve: int
) -> None:
    cfg = msgspec.convert(
        {"mode": mode, "kv_blocks": kv_blocks, "max_num_seqs": max_num_seqs}, SimConfig
    )
    bound = ceiling(cfg, prompt, output, mean_max_tokens=reserve)
    measured = throughput_under_overload(cfg, prompt, output, reserve)
    assert measured <= bound.tokens_per_sim_s
    assert measured >= 0.75 * bound.tokens_per_sim_s


def test_ceiling_formula_and_wall_clock_scaling() -> None:
    cfg = SimConfig(
        kv_blocks=100,
        block_size=10,
        max_num_seqs=1000,
        decode_step_s=0.01,
        step_per_seq_s=0.001,
        prefill_tokens_per_s=1000.0,
        time_scale=4.0,
    )
    bound = ceiling(cfg, 40, 21)  # holds 40 + 10 = 50 tokens on average: B = 1000 / 50 = 20
    assert bound.batch == pytest.approx(20.0)
    assert bound.limited_by == "memory"
    assert bound.step_s == pytest.approx(0.01 + 0.02 + 20 * 40 / 21 / 1000)
    assert bound.tokens_per_sim_s == pytest.approx(20 / bound.step_s)
    assert ceiling_tokens_per_s(cfg, 40, 21) == pytest.approx(4 * bound.tokens_per_sim_s)
    assert ceiling(cfg, 40, 21, mean_max_tokens=60).batch == pytest.approx(20.0)  # paged: unused
    contiguous = msgspec.structs.replace(cfg, mode="contiguous")
    assert ceiling(contiguous, 40, 21, mean_max_tokens=60).batch == pytest.approx(10.0)


# ---- chunked prefill and attention cost ------------------------------------------------------


def test_chunked_prefill_spreads_a_prompt_over_steps_within_the_token_budget() -> None:
    cfg = SimConfig(
        kv_blocks=256,
        decode_step_s=0.01,
        step_per_seq_s=0.0,
        prefill_tokens_per_s=1000.0,
        max_num_batched_tokens=100,
    )
    engine = Engine(cfg)
    decoder = engine.submit(prompt_tokens=10, max_tokens=50, output_tokens=50)
    first = engine.step()  # the short prompt fits the budget: its first token at once
    assert (first.prefill_tokens, first.tokens) == (10, [decoder])
    long = engine.submit(prompt_tokens=250, max_tokens=5, output_tokens=5)
    steps = [engine.step() for _ in range(3)]
    # 99 + 99 + 52: the decoding sequence takes one token of each step's budget
    assert [s.prefill_tokens for s in steps] == [99, 99, 52]
    assert [long in s.tokens for s in steps] == [False, False, True]
    assert all(decoder in s.tokens for s in steps)
    assert steps[0].duration_s == pytest.approx(0.01 + 99 / 1000.0)


def test_without_a_budget_a_prompt_is_prefilled_whole() -> None:
    engine = Engine(SimConfig(kv_blocks=256))
    seq = engine.submit(prompt_tokens=1000, max_tokens=5, output_tokens=5)
    step = engine.step()
    assert (step.prefill_tokens, step.tokens) == (1000, [seq])


def test_decode_step_time_grows_with_the_tokens_attended() -> None:
    cfg = SimConfig(kv_blocks=1024, decode_step_s=0.01, step_per_seq_s=0.0, attend_s_per_token=1e-5)
    durations = {}
    for prompt in (100, 2100):
        engine = Engine(cfg)
        engine.submit(prompt_tokens=prompt, max_tokens=3, output_tokens=3)
        engine.step()  # prefill: attends nothing in the decode term
        durations[prompt] = engine.step().duration_s  # context = prompt + 1 token
    assert durations[100] == pytest.approx(0.01 + 1e-5 * 101)
    assert durations[2100] - durations[100] == pytest.approx(1e-5 * 2000)
