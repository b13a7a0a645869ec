"""Prompt prefixes a backend with prefix caching likely holds: the chunk chain, the bounded
recency index, and what admission charges a request that shares a prefix."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.admission import Admission, Placement
from gateway.core.backend import BackendConfig, BackendSignals
from gateway.core.capacity import CapacityConfig
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health
from gateway.core.pool import AdmissionConfig, ModelPool, Ticket
from gateway.core.prefixes import CHUNK_BYTES, PrefixIndex, prompt_chain
from gateway.core.types import Priority

SYSTEM = "You are a careful assistant. " * 40  # 1,160 bytes: four whole chunks


def test_a_chain_has_one_hash_per_whole_chunk_and_depends_on_all_text_before() -> None:
    chain = prompt_chain([SYSTEM, "first question"])
    assert len(chain) == len((SYSTEM + "first question").encode()) // CHUNK_BYTES
    other = prompt_chain([SYSTEM, "a different question, longer than the first one"])
    assert other[:4] == chain[:4]  # the shared system prompt's chunks
    moved = prompt_chain(["x" + SYSTEM])
    assert not set(moved) & set(chain)  # the same chunks after other text are other chunks
    assert prompt_chain(["short"]) == ()


def test_the_index_finds_leading_chunks_only_and_forgets_the_least_recent() -> None:
    index = PrefixIndex(capacity=6)
    index.remember((1, 2, 3, 4))
    assert index.cached_chunks((1, 2, 9, 4)) == 2
    assert index.cached_chunks((9, 1, 2)) == 0
    index.remember((5, 6, 7))  # seven chunks for six places: 1 goes
    assert len(index) == 6
    assert index.cached_chunks((1, 2)) == 0
    index.remember((2,))  # used again: the most recent now
    index.remember((8,))  # 3 goes, not 2
    assert index.cached_chunks((2,)) == 1
    assert index.cached_chunks((3,)) == 0


@given(ops=st.lists(st.lists(st.integers(0, 30), max_size=8), max_size=40), cap=st.integers(0, 12))
def test_the_index_never_holds_more_than_its_capacity(ops: list[list[int]], cap: int) -> None:
    index = PrefixIndex(capacity=cap)
    for chain in ops:
        index.remember(tuple(chain))
        assert len(index) <= cap
        if chain and cap >= len(set(chain)):
            assert index.cached_chunks((chain[-1],)) == 1  # what was just sent is there


KVT = 1024
M = "m"


def _admission(clock: FakeClock, caching: bool) -> Admission:
    paged = BackendConfig(url="a", kv_capacity_bytes=100_000 * KVT, block_size=16)
    config = AdmissionConfig(models=(ModelPool(M, KVT, (paged,)),), capacity=CapacityConfig(0.0))
    adm = Admission(config, clock.now())
    adm.observe_health(M, "a", Health.OK, clock.now())
    sig = BackendSignals(at=clock.now(), prefix_caching=caching)
    adm.observe_signals(M, "a", sig, clock.now())
    return adm


def _ticket(clock: FakeClock, question: str) -> Ticket:
    chain = prompt_chain([SYSTEM, question])
    return Ticket(
        "t", M, Priority.STANDARD, 1.0, 320, 100, KVT, clock.now() + 30, prefix=chain,
        chunk_tokens=CHUNK_BYTES / 4.0,
    )  # fmt: skip


def test_a_request_sharing_a_placed_prefix_reserves_only_its_own_tokens() -> None:
    clock = FakeClock()
    adm = _admission(clock, caching=True)
    assert adm.caches_prefixes(M)
    first = adm.offer(_ticket(clock, "what is a KV cache?"), clock.now())
    assert isinstance(first, Placement)
    assert first.reserved_bytes == 432 * KVT  # 320 + 100, in 16-token blocks
    second = adm.offer(_ticket(clock, "and a block table?"), clock.now())
    assert isinstance(second, Placement)
    # four chunks of 64 tokens are held already: 320 - 256 + 100 tokens
    assert second.reserved_bytes == 176 * KVT


def test_nothing_is_discounted_where_the_backend_does_not_cache() -> None:
    clock = FakeClock()
    adm = _admission(clock, caching=False)
    assert not adm.caches_prefixes(M)
    for question in ("what is a KV cache?", "and a block table?"):
        placed = adm.offer(_ticket(clock, question), clock.now())
        assert isinstance(placed, Placement)
        assert placed.reserved_bytes == 432 * KVT


def test_a_prompt_entirely_cached_still_reserves_its_last_token() -> None:
    clock = FakeClock()
    adm = _admission(clock, caching=True)
    t = Ticket("t", M, Priority.STANDARD, 1.0, 256, 10, KVT, clock.now() + 30,
               prefix=prompt_chain([SYSTEM]), chunk_tokens=64.0)  # fmt: skip
    assert isinstance(adm.offer(t, clock.now()), Placement)
    again = adm.offer(t, clock.now())
    assert isinstance(again, Placement)
    assert again.reserved_bytes == 16 * KVT  # one token of prompt and ten of output, a block
