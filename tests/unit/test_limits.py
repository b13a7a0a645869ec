"""The bucket step of the request path (``gateway.proxy.limits``): charging a request's cost to
its buckets on an in-process or a networked store, settling it afterwards, and the
``x-ratelimit-*`` headers and 429 it is described by. Time is a FakeClock; the in-process store
is the real one, the networked one a fake whose reply a test releases."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

from gateway.core.bucket import BucketSpec, Verdict
from gateway.core.clock import FakeClock
from gateway.core.cost import Cost, settlement
from gateway.core.types import Unit
from gateway.proxy.limits import Charge, charge, rate_refusal, ratelimit_headers, settle
from gateway.store.memory import MemoryLimitStore

REQUESTS = BucketSpec("tenant:acme:requests", Unit.REQUESTS, rate_per_s=1.0, burst=10.0)
TOKENS = BucketSpec("tenant:acme:tokens", Unit.TOKENS, rate_per_s=10.0, burst=1000.0)
MODEL_TOKENS = BucketSpec("model:m1:tokens", Unit.TOKENS, rate_per_s=100.0, burst=5000.0)
KV = BucketSpec("tenant:acme:kv_bytes", Unit.KV_BYTES, rate_per_s=1e6, burst=1e9)
SPECS = (REQUESTS, TOKENS)
COST = Cost(
    requests=1, input_tokens=100, output_tokens=500, kv_bytes=10**6, kv_gib_seconds=0.5, price=0.0
)
USED = Cost(
    requests=1, input_tokens=100, output_tokens=20, kv_bytes=10**5, kv_gib_seconds=0.1, price=0.0
)


class NetworkedStore:
    """A store behind a round trip (Redis, as the gateway sees it): nothing answers at once; a
    take is applied when its command runs, and its reply waits for ``reply`` to be set."""

    def __init__(self, inner: MemoryLimitStore) -> None:
        self.inner = inner
        self.applied = asyncio.Event()
        self.reply = asyncio.Event()
        self.acquired: list[tuple[float, ...]] = []
        self.adjusted: list[tuple[float, ...]] = []
        self.fails = False

    @property
    def degraded(self) -> bool:
        return False

    def acquire_now(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> None:
        return None

    async def acquire(
        self, specs: Sequence[BucketSpec], amounts: Sequence[float], max_wait_s: float = 0.0
    ) -> Verdict:
        self.acquired.append(tuple(amounts))
        verdict = self.inner.acquire_now(specs, amounts, max_wait_s)
        self.applied.set()
        await self.reply.wait()
        if self.fails:
            raise ConnectionError("the reply was lost")
        return verdict

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return False

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        self.adjusted.append(tuple(deltas))
        self.inner.adjust_now(specs, deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        return self.inner.peek_now(specs)

    async def close(self) -> None:
        return None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory(clock: FakeClock) -> MemoryLimitStore:
    return MemoryLimitStore(clock)


@pytest.fixture
def remote(memory: MemoryLimitStore) -> NetworkedStore:
    return NetworkedStore(memory)


def _orphans() -> tuple[list[Charge], Any]:
    seen: list[Charge] = []
    return seen, seen.append


def _finished(coroutine: Coroutine[Any, Any, Charge]) -> Charge:
    """The result of a coroutine that must finish without suspending once."""
    with pytest.raises(StopIteration) as done:
        coroutine.send(None)
    result: Charge = done.value.value
    return result


async def _the_take_left_behind() -> None:
    """Await the store's take a cancelled charge left running. Its done callbacks were added
    before this wait's, so they have run when it returns."""
    (take,) = asyncio.all_tasks() - {asyncio.current_task()}
    await take


# -- charge ----------------------------------------------------------------------------------------


def test_an_in_process_store_charges_without_suspending(memory: MemoryLimitStore) -> None:
    orphans, orphaned = _orphans()
    held = _finished(charge(memory, SPECS, COST, orphaned=orphaned))
    assert held.specs == SPECS
    assert held.amounts == (1.0, 600.0)
    assert held.units == (Unit.REQUESTS, Unit.TOKENS)
    assert held.verdict.allowed
    assert held.charged
    assert memory.peek_now(SPECS) == (9.0, 400.0)
    assert not orphans


def test_a_charge_a_bucket_refuses_takes_nothing_and_has_nothing_to_settle(
    memory: MemoryLimitStore,
) -> None:
    big = Cost(
        requests=1, input_tokens=100, output_tokens=950, kv_bytes=0, kv_gib_seconds=0.0, price=0.0
    )
    held = _finished(charge(memory, SPECS, big, orphaned=_orphans()[1]))
    assert not held.verdict.allowed
    assert held.verdict.never  # 1050 tokens against a burst of 1000
    assert held.verdict.blocking == 1
    assert not held.charged
    assert memory.peek_now(SPECS) == (10.0, 1000.0)


async def test_no_buckets_is_allowed_without_asking_the_store(remote: NetworkedStore) -> None:
    held = _finished(charge(remote, (), COST, orphaned=_orphans()[1]))
    assert held.verdict == Verdict(allowed=True)
    assert held.amounts == ()
    assert not held.charged
    assert not remote.acquired


async def test_a_networked_store_is_awaited_for_its_verdict(remote: NetworkedStore) -> None:
    orphans, orphaned = _orphans()
    task = asyncio.ensure_future(charge(remote, SPECS, COST, orphaned=orphaned))
    await remote.applied.wait()
    assert not task.done()  # the reply is still on its way
    remote.reply.set()
    held = await task
    assert remote.acquired == [(1.0, 600.0)]
    assert held.verdict.allowed
    assert held.verdict.remaining == (9.0, 400.0)
    assert not orphans


async def test_a_client_cancelled_during_the_round_trip_hands_over_the_charge_that_landed(
    remote: NetworkedStore,
) -> None:
    orphans, orphaned = _orphans()
    task = asyncio.ensure_future(charge(remote, SPECS, COST, orphaned=orphaned))
    await remote.applied.wait()
    task.cancel()  # the client hangs up while the store's reply is on its way
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not orphans  # nothing is known yet: the reply has not come
    remote.reply.set()
    await _the_take_left_behind()
    assert len(orphans) == 1
    orphan = orphans[0]
    assert orphan.specs == SPECS
    assert orphan.amounts == (1.0, 600.0)
    assert orphan.verdict.allowed
    assert orphan.charged
    assert remote.inner.peek_now(SPECS) == (9.0, 400.0)  # it landed: it is owed back
    pending = settle(remote, orphan, None)
    assert pending is not None
    await pending
    assert remote.inner.peek_now(SPECS) == (9.0, 1000.0)  # all but the request itself


async def test_a_take_whose_reply_failed_after_the_client_left_hands_over_nothing(
    remote: NetworkedStore,
) -> None:
    orphans, orphaned = _orphans()
    remote.fails = True
    task = asyncio.ensure_future(charge(remote, SPECS, COST, orphaned=orphaned))
    await remote.applied.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    remote.reply.set()
    with pytest.raises(ConnectionError):
        await _the_take_left_behind()
    assert not orphans  # the store's own error path owns a failed take


# -- settle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "verdict",
    [
        Verdict(allowed=False, retry_after_s=1.0, blocking=1),
        Verdict(allowed=True, store_error=True),  # the fallback let it pass: nothing was taken
    ],
    ids=["refused", "store-error"],
)
def test_nothing_is_settled_for_a_charge_that_took_nothing(
    remote: NetworkedStore, verdict: Verdict
) -> None:
    held = Charge(SPECS, (1.0, 600.0), verdict)
    assert settle(remote, held, USED) is None
    assert settle(remote, held, None) is None
    assert not remote.adjusted


def test_nothing_is_settled_for_a_charge_without_buckets(remote: NetworkedStore) -> None:
    assert settle(remote, Charge((), (), Verdict(allowed=True)), USED) is None


def test_an_exact_estimate_has_nothing_to_settle(remote: NetworkedStore) -> None:
    held = Charge(SPECS, (1.0, 600.0), Verdict(allowed=True, remaining=(9.0, 400.0)))
    assert settle(remote, held, COST) is None
    assert not remote.adjusted


def test_the_in_process_store_settles_at_once(memory: MemoryLimitStore) -> None:
    held = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert settle(memory, held, USED) is None
    assert memory.peek_now(SPECS) == (9.0, 880.0)  # 480 of the 500 output tokens came back


def test_the_in_process_store_refunds_all_but_the_request_of_one_that_went_nowhere(
    memory: MemoryLimitStore,
) -> None:
    held = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert settle(memory, held, None) is None
    assert memory.peek_now(SPECS) == (9.0, 1000.0)


async def test_a_networked_store_settles_when_the_returned_round_trip_runs(
    remote: NetworkedStore,
) -> None:
    remote.reply.set()
    held = await charge(remote, SPECS, COST, orphaned=_orphans()[1])
    over = Cost(
        requests=1, input_tokens=100, output_tokens=700, kv_bytes=0, kv_gib_seconds=0.0, price=0.0
    )
    pending = settle(remote, held, over)
    assert pending is not None
    assert remote.inner.peek_now(SPECS) == (9.0, 400.0)  # not yet: the caller runs it
    await pending
    assert remote.adjusted == [settlement(held.units, held.amounts, over)] == [(0.0, 200.0)]
    assert remote.inner.peek_now(SPECS) == (9.0, 200.0)  # the overrun is charged


# -- ratelimit_headers -----------------------------------------------------------------------------


def test_headers_name_the_tightest_bucket_of_each_unit() -> None:
    specs = (TOKENS, REQUESTS, MODEL_TOKENS, KV)
    verdict = Verdict(
        allowed=True,
        remaining=(700.4, 3.0, 120.6, 5.0),
        reset_s=(30.0, 7.0, 0.25, 1.0),
    )
    headers = ratelimit_headers(Charge(specs, (1.0, 1.0, 1.0, 1.0), verdict))
    assert headers == {
        "x-ratelimit-limit-tokens": "5000",  # the model's bucket has fewer tokens left
        "x-ratelimit-remaining-tokens": "121",
        "x-ratelimit-reset-tokens": "250ms",
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "3",
        "x-ratelimit-reset-requests": "7s",
    }  # kv_bytes has no OpenAI header


@pytest.mark.parametrize(
    ("reset_s", "text"),
    [
        (0.0, "0ms"),
        (0.0004, "1ms"),
        (0.25, "250ms"),
        (0.9999, "1000ms"),
        (1.0, "1s"),
        (1.2, "2s"),  # rounded up: never early
        (59.5, "1m0s"),
        (360.0, "6m0s"),
        (3600.0, "1h0m0s"),
        (3725.0, "1h2m5s"),
    ],
)
def test_the_reset_header_is_in_openais_format(reset_s: float, text: str) -> None:
    verdict = Verdict(allowed=True, remaining=(1.0,), reset_s=(reset_s,))
    headers = ratelimit_headers(Charge((TOKENS,), (1.0,), verdict))
    assert headers["x-ratelimit-reset-tokens"] == text


def test_an_overrun_bucket_reports_zero_remaining() -> None:
    verdict = Verdict(allowed=True, remaining=(-250.0,), reset_s=(125.0,))
    headers = ratelimit_headers(Charge((TOKENS,), (1.0,), verdict))
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == "2m5s"


def test_a_verdict_the_fallback_made_up_has_no_headers() -> None:
    verdict = Verdict(allowed=True, store_error=True)
    assert ratelimit_headers(Charge(SPECS, (1.0, 600.0), verdict)) == {}


def test_headers_of_a_real_charge_follow_the_clock(
    memory: MemoryLimitStore, clock: FakeClock
) -> None:
    held = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert ratelimit_headers(held) == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "1m0s",  # 600 tokens at 10/s
    }
    clock.advance(30.0)
    later = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert later.verdict.allowed
    assert ratelimit_headers(later)["x-ratelimit-remaining-tokens"] == "100"
    assert ratelimit_headers(later)["x-ratelimit-reset-tokens"] == "1m30s"


# -- rate_refusal ----------------------------------------------------------------------------------


def _error(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(response.body)["error"]
    return error


def test_a_refusal_is_a_429_naming_the_bucket_and_when_to_retry(
    memory: MemoryLimitStore,
) -> None:
    first = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert first.verdict.allowed
    held = _finished(charge(memory, SPECS, COST, orphaned=_orphans()[1]))
    assert not held.verdict.allowed
    assert held.verdict.retry_after_s == pytest.approx(20.0)  # 200 more tokens at 10/s
    headers = ratelimit_headers(held)
    response = rate_refusal(held, headers)
    assert response.status == 429
    assert response.content_type == "application/json"
    error = _error(response)
    assert error["type"] == "tokens"
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"] == (
        "Rate limit reached for tokens ('tenant:acme:tokens': 10/s, burst 1000). Retry in 20.000s."
    )
    assert response.headers["Retry-After"] == "20"
    assert response.headers["retry-after-ms"] == "20000"
    assert response.headers["x-kvgate-outcome"] == "rate_limited"
    assert "x-should-retry" not in response.headers
    for name, value in headers.items():
        assert response.headers[name] == value
    assert response.headers["x-ratelimit-remaining-tokens"] == "400"


def test_a_refusal_without_a_blocking_bucket_names_the_first() -> None:
    verdict = Verdict(allowed=False, retry_after_s=0.0015)
    response = rate_refusal(Charge(SPECS, (1.0, 600.0), verdict), {})
    assert response.status == 429
    error = _error(response)
    assert error["type"] == "requests"
    assert "'tenant:acme:requests': 1/s, burst 10" in error["message"]
    assert response.headers["Retry-After"] == "1"  # rounded up: never early
    assert response.headers["retry-after-ms"] == "2"


def test_a_request_larger_than_the_burst_is_told_it_never_passes(
    memory: MemoryLimitStore,
) -> None:
    big = Cost(
        requests=1, input_tokens=100, output_tokens=1900, kv_bytes=0, kv_gib_seconds=0.0, price=0.0
    )
    held = _finished(charge(memory, SPECS, big, orphaned=_orphans()[1]))
    assert held.verdict.never
    response = rate_refusal(held, ratelimit_headers(held))
    assert response.status == 429
    assert response.headers["x-should-retry"] == "false"
    assert "Retry-After" not in response.headers
    assert "retry-after-ms" not in response.headers
    assert response.headers["x-kvgate-outcome"] == "rate_limited"
    error = _error(response)
    assert error["type"] == "tokens"
    assert error["code"] == "rate_limit_exceeded"
    assert error["message"] == (
        "This request needs 2000 tokens but the limit 'tenant:acme:tokens' holds at most 1000: "
        "it can never pass. Make the request smaller."
    )
    assert memory.peek_now(SPECS) == (10.0, 1000.0)  # nothing was taken
