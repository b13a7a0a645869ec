"""Prefix caching in the simulated GPU: the caching allocator, the engine sharing, evicting and
counting cached blocks, and the block hashes the wire derives from prompt text. Simulated time
only."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.sim.config import SimConfig
from gateway.sim.engine import Engine, StepResult, validate_config
from gateway.sim.prefix import PrefixCachingAllocator
from gateway.sim.wire import decode_request, prompt_block_hashes

BS = 4
CACHING = SimConfig(
    kv_blocks=20,
    block_size=BS,
    prefix_caching=True,
    decode_step_s=0.01,
    step_per_seq_s=0.0,
    prefill_tokens_per_s=1000.0,
)


def chain(tag: int, blocks: int) -> tuple[int, ...]:
    """Stand-in block hashes: prompts with the same tag share them up to the shorter's end."""
    return tuple(hash(("test prompt", tag, i)) for i in range(blocks))


def run_until_idle(engine: Engine) -> list[StepResult]:
    results = []
    while engine.has_work():
        results.append(engine.step())
        assert len(results) < 100_000
    return results


def check_blocks(engine: Engine) -> None:
    total = engine.config.kv_blocks
    assert engine.used_blocks + engine.free_blocks() == total
    assert 0 <= engine.evictable_blocks() <= engine.free_blocks()
    assert 0 <= engine.cached_held_blocks() <= engine.used_blocks


# ---- the allocator ---------------------------------------------------------------------------


def test_allocator_shares_held_blocks_and_evicts_the_least_recently_freed() -> None:
    pool = PrefixCachingAllocator(6)
    a, b, c = 11, 12, 13
    assert pool.take_with_prefix([], 3) == 0
    assert [pool.register(h) for h in (a, b, c)] == [True, True, True]
    assert pool.register(a) is False  # a copy of a resident block stays private
    assert pool.lookup([a, b, 99, c]) == (2, 0)
    assert pool.take_with_prefix([a, b], 1) == 2  # both held by the first sequence already
    assert (pool.used_blocks, pool.held_hashed_blocks) == (4, 3)
    assert pool.release([a, b, c], 0) == 2  # a and b are still held by the second
    assert (pool.used_blocks, pool.free_blocks, pool.evictable_blocks) == (3, 3, 1)
    assert pool.release([a, b], 1) == 0
    # freed tail first: c (first sequence), then b, then a
    assert (pool.free_blocks, pool.evictable_blocks, pool.lookup([a, b, c])) == (6, 3, (3, 3))
    assert pool.take(4)  # three empty blocks, then the least recently freed cached one: c
    assert pool.lookup([c]) == (0, 0)
    assert pool.lookup([a, b]) == (2, 2)
    assert pool.take_with_prefix([a, b], 1) is None  # reviving 2 and 1 new: only 2 free
    assert pool.take_with_prefix([a], 1) == 0
    assert (pool.free_blocks, pool.evictable_blocks) == (0, 0)  # b made way for the new block
    assert not pool.take(1)
    pool.reset()
    assert (pool.free_blocks, pool.evictable_blocks, pool.lookup([a])) == (6, 0, (0, 0))


# ---- the engine ------------------------------------------------------------------------------


def test_a_repeated_prompt_prefills_only_its_uncached_tail_and_shares_its_blocks() -> None:
    engine = Engine(CACHING)
    hashes = chain(1, 5)  # 22 tokens: 5 full blocks and 2 tokens
    first = engine.submit(22, 3, 3, hashes)
    assert engine.step().prefill_tokens == 22
    assert (engine.used_blocks, engine.cached_held_blocks()) == (6, 5)
    second = engine.submit(22, 3, 3, hashes)
    step = engine.step()
    assert (step.prefill_tokens, step.tokens) == (2, [first, second])
    assert step.duration_s == pytest.approx(0.01 + 2 / 1000.0)
    assert engine.used_blocks == 7  # the 5 shared blocks once, and one block of each's own
    assert engine.seq_cached_blocks(second) == 5
    stats = engine.snapshot()
    assert stats.kv_filled_avg <= stats.kv_utilisation_avg  # shared tokens are counted once
    run_until_idle(engine)
    check_blocks(engine)
    assert engine.used_blocks == 0


def test_the_last_prompt_token_is_always_computed() -> None:
    engine = Engine(CACHING)
    hashes = chain(2, 4)  # 16 tokens: every block full
    engine.submit(16, 2, 2, hashes)
    run_until_idle(engine)
    engine.submit(16, 2, 2, hashes)
    assert engine.step().prefill_tokens == BS  # three blocks hit; the last is recomputed
    assert engine.snapshot().prefix_cache_hits == 3 * BS


def test_only_the_common_leading_blocks_are_shared() -> None:
    engine = Engine(CACHING)
    engine.submit(20, 2, 2, chain(3, 5))
    run_until_idle(engine)
    diverging = (*chain(3, 2), *chain(4, 3))[:5]  # same first two blocks, then other text
    engine.submit(20, 2, 2, diverging)
    assert engine.step().prefill_tokens == 20 - 2 * BS
    engine.submit(20, 2, 2, None)  # None: this request does not use the cache
    assert engine.step().prefill_tokens == 20


def test_freed_blocks_count_as_free_and_are_evicted_lru_only_when_needed() -> None:
    cfg = msgspec.structs.replace(CACHING, kv_blocks=12)
    engine = Engine(cfg)
    old, new, third = chain(5, 4), chain(6, 4), chain(7, 4)
    for hashes in (old, new):
        engine.submit(16, 1, 1, hashes)
        run_until_idle(engine)
    assert (engine.free_blocks(), engine.evictable_blocks()) == (12, 8)
    engine.submit(15, 2, 2, third)  # its second token fills its fourth block: no fifth
    engine.step()  # four empty blocks are left: it takes those and evicts nothing
    assert (engine.used_blocks, engine.evictable_blocks(), engine.free_blocks()) == (4, 8, 8)
    run_until_idle(engine)
    assert (engine.free_blocks(), engine.evictable_blocks()) == (12, 12)
    engine.submit(8, 1, 1, chain(8, 2))
    engine.step()  # two blocks, both evicted: the least recently freed, old's tail first
    assert engine.prefix_hits(old, 16) == (2, 2)
    assert engine.prefix_hits(new, 16) == engine.prefix_hits(third, 16) == (3, 3)
    engine.submit(45, 3, 3, chain(9, 11))  # needs all 12 blocks: every one is free, if cached
    engine.step()
    assert engine.used_blocks == 12
    assert engine.prefix_hits(new, 16) == (0, 0)
    check_blocks(engine)


def test_held_cached_blocks_are_never_evicted() -> None:
    cfg = msgspec.structs.replace(CACHING, kv_blocks=8)
    engine = Engine(cfg)
    filler, shared = chain(10, 4), chain(9, 4)
    engine.submit(16, 1, 1, filler)
    run_until_idle(engine)
    engine.submit(16, 14, 14, shared)  # grows to all 8 blocks: it must evict the filler's
    for _ in range(13):
        engine.step()
        assert engine.prefix_hits(shared, 16) == (3, 0)  # resident, and held: not evictable
        check_blocks(engine)
    assert engine.prefix_hits(filler, 16)[0] <= 1


def test_a_preempted_sequence_finds_its_blocks_again() -> None:
    def readmission_prefills(caching: bool) -> tuple[list[int], Engine]:
        cfg = msgspec.structs.replace(CACHING, kv_blocks=7, prefix_caching=caching)
        engine = Engine(cfg)
        a = engine.submit(8, 12, 12, chain(11, 2))
        b = engine.submit(8, 12, 12, chain(12, 2))
        results = run_until_idle(engine)
        assert results[0].prefill_tokens == 16
        assert sorted(seq for r in results for seq in r.tokens) == [a] * 12 + [b] * 12
        assert engine.snapshot().preemptions == 1
        check_blocks(engine)
        return [r.prefill_tokens for r in results[1:] if r.prefill_tokens], engine

    # b is preempted after 5 tokens; it comes back with 8 + 5 tokens to compute
    assert readmission_prefills(False)[0] == [13]
    cached, engine = readmission_prefills(True)
    assert cached == [13 - 2 * BS]  # its prompt's blocks were still cached (its third, not)
    stats = engine.snapshot()
    assert stats.prefix_cache_queries == 16  # a preempted request's lookups are counted apart
    assert stats.prefix_cache_hits == 0


def test_counters_and_an_off_switch_that_changes_nothing() -> None:
    def run(config: SimConfig, hashes: bool) -> tuple[list[StepResult], Engine]:
        engine = Engine(config)
        for i in range(40):
            prompt = 30 + (i * 7) % 50
            engine.submit(prompt, 20, 5 + i % 9, chain(i % 3, prompt // BS) if hashes else None)
        return run_until_idle(engine), engine

    off = msgspec.structs.replace(CACHING, prefix_caching=False, kv_blocks=60)
    plain, _ = run(off, hashes=False)
    ignored, quiet = run(off, hashes=True)
    assert ignored == plain
    assert quiet.snapshot().prefix_cache_queries == 0
    cached, engine = run(msgspec.structs.replace(off, prefix_caching=True), hashes=True)
    stats = engine.snapshot()
    assert stats.prefix_cache_queries == sum(30 + (i * 7) % 50 for i in range(40))
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    assert sum(r.prefill_tokens for r in cached) < sum(r.prefill_tokens for r in plain)
    assert stats.prefill_tokens == sum(r.prefill_tokens for r in cached)


def test_prefix_caching_is_for_paged_caches_only() -> None:
    with pytest.raises(ValueError, match="prefix_caching=True"):
        validate_config(SimConfig(mode="contiguous", prefix_caching=True))


def test_a_restart_empties_the_cache() -> None:
    engine = Engine(CACHING)
    engine.submit(20, 2, 2, chain(13, 5))
    run_until_idle(engine)
    assert engine.evictable_blocks() == 5
    engine.restart(0.0)
    assert (engine.evictable_blocks(), engine.prefix_hits(chain(13, 5), 20)) == (0, (0, 0))


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.sampled_from(["submit", "step", "step", "cancel"]),
            st.integers(0, 3),  # which prefix (3: none)
            st.integers(1, 40),  # prompt tokens
            st.integers(1, 12),  # output tokens
        ),
        max_size=80,
    ),
    kv_blocks=st.integers(10, 24),
    budget=st.sampled_from([0, 6]),
)
def test_blocks_are_never_lost_or_freed_twice(
    ops: list[tuple[str, int, int, int]], kv_blocks: int, budget: int
) -> None:
    """Whatever the mix of shared prefixes, preemption, chunked prefill and cancels: held plus
    free (evictable included) is the whole cache at every point, no block is given back twice
    (the pool raises), and once idle every block and every share of one is back."""
    cfg = msgspec.structs.replace(CACHING, kv_blocks=kv_blocks, max_num_batched_tokens=budget)
    engine = Engine(cfg)
    ids: list[int] = []
    for op, prefix, prompt, output in ops:
        if op == "submit":
            hashes = None if prefix == 3 else chain(prefix, prompt // BS)
            if prompt + output <= engine.context_tokens:
                ids.append(engine.submit(prompt, output, output, hashes))
        elif op == "step" and engine.has_work():
            engine.step()
        elif op == "cancel" and ids:
            engine.cancel(ids.pop(prefix % len(ids)))
        check_blocks(engine)
        assert 0 <= engine.stats.kv_tokens <= engine.used_blocks * BS
    run_until_idle(engine)
    check_blocks(engine)
    assert (engine.used_blocks, engine.cached_held_blocks()) == (0, 0)
    assert engine.stats.kv_tokens == 0


# ---- block hashes from the wire --------------------------------------------------------------


def chat(*contents: str) -> bytes:
    messages = [{"role": "user", "content": c} for c in contents]
    return msgspec.json.encode({"model": "m", "messages": messages})


def test_block_hashes_chain_the_prompt_text_in_block_sized_pieces() -> None:
    text = "abcdefgh" * 20  # 160 characters: 2 full blocks of 64 (16 tokens of 4 characters)
    one = prompt_block_hashes(decode_request("chat", chat(text)), 4.0, 16)
    assert len(one) == 2
    # the messages' text in order: how it is split into messages does not matter
    assert prompt_block_hashes(decode_request("chat", chat(text[:50], text[50:])), 4.0, 16) == one
    other = text[:70] + "X" + text[71:]  # differs in the second block only
    two = prompt_block_hashes(decode_request("chat", chat(other)), 4.0, 16)
    assert (two[0], two[1] != one[1]) == (one[0], True)
    completion = msgspec.json.encode({"model": "m", "prompt": text})
    assert prompt_block_hashes(decode_request("completion", completion), 4.0, 16) == one
    assert len(prompt_block_hashes(decode_request("chat", chat(text)), 2.5, 16)) == 4  # 40 chars
    ids = msgspec.json.encode({"model": "m", "prompt": list(range(35))})
    id_hashes = prompt_block_hashes(decode_request("completion", ids), 4.0, 16)
    assert len(id_hashes) == 2
    nested = msgspec.json.encode({"model": "m", "prompt": [list(range(35))]})
    assert prompt_block_hashes(decode_request("completion", nested), 4.0, 16) == id_hashes
