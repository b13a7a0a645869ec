"""What the proxy tests send through the gateway and how they read what it counted."""

from __future__ import annotations

from aiohttp import web

from gateway.metrics import Metrics

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
