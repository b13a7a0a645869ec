"""What the proxy tests send through the gateway and how they read what it counted."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from aiohttp import web

from gateway.core.bucket import BucketSpec, Verdict
from gateway.metrics import Metrics
from gateway.store.memory import MemoryLimitStore

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}
TOKENS_LIMIT = "      - {unit: tokens, rate: 1000/min}"  # acme's limits: 1000 tokens of burst


def tokens_counted(metrics: Metrics, kind: str, tenant: str = "anon") -> float | None:
    labels = {"tenant": tenant, "model": "m1", "kind": kind}
    return metrics.registry.get_sample_value("kvgate_tokens_total", labels)


def requests_counted(metrics: Metrics, outcome: str, tenant: str = "anon") -> float | None:
    """``kvgate_requests_total`` of ``tenant`` on m1 with ``outcome``, over every status."""
    return requests_total(metrics, tenant=tenant, model="m1", outcome=outcome)


def requests_total(metrics: Metrics, **labels: str) -> float | None:
    """``kvgate_requests_total`` summed over the series whose labels include ``labels``; None
    when there is none."""
    total = None
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "kvgate_requests_total" and labels.items() <= sample.labels.items():
                total = (total or 0.0) + sample.value
    return total


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class HeldStore:
    """A networked store (Redis) seen from the gateway: a take is applied when its command runs
    (``applied`` is set), and its reply comes back only once ``reply`` is set; settlement goes
    through the round trip too. Tests use it to hold a request between charge and admission."""

    def __init__(self, inner: MemoryLimitStore) -> None:
        self.inner = inner
        self.applied = asyncio.Event()
        self.reply = asyncio.Event()

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
        verdict = self.inner.acquire_now(specs, amounts, max_wait_s)
        self.applied.set()
        await self.reply.wait()
        return verdict

    def adjust_now(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> bool:
        return False

    async def adjust(self, specs: Sequence[BucketSpec], deltas: Sequence[float]) -> None:
        self.inner.adjust_now(specs, deltas)

    async def peek(self, specs: Sequence[BucketSpec]) -> tuple[float, ...]:
        return self.inner.peek_now(specs)

    async def close(self) -> None:
        return None
