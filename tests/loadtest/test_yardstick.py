"""The yardstick: the LP bound holds over the clairvoyant scheduler, which never preempts, on
small traces of every backend shape; and over real targets run on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from loadtest.bound import upper_bound
from loadtest.compare import run_targets, summarise_all
from loadtest.generator import PlannedRequest, plan
from loadtest.oracle import clairvoyant
from loadtest.scenario import LimiterSpec, Scenario, Slo

BACKEND: dict[str, Any] = {
    "mode": "paged",
    "kv_blocks": 128,
    "block_size": 16,
    "max_num_seqs": 32,
    "decode_step_s": 0.02,
    "step_per_seq_s": 0.0005,
    "prefill_tokens_per_s": 8000,
    "time_scale": 1.0,
}


def small(backend: dict[str, Any] | None = None, **top: Any) -> Scenario:
    data: dict[str, Any] = {
        "name": "small",
        "description": "a small overload",
        "seed": 3,
        "duration_s": 4,
        "drain_timeout_s": 4,
        "backend": {**BACKEND, **(backend or {})},
        "tenants": {
            "a": {
                "key": "sk-lt-aaaa-0001",
                "arrivals": [{"kind": "poisson", "rate_per_s": 20}],
                "prompt_tokens": {"kind": "uniform", "low": 40, "high": 400},
                "output_tokens": {"kind": "lognormal", "median": 60, "sigma": 0.7, "max": 300},
                "max_tokens": {"kind": "fixed", "value": 300},
                "stream_share": 0.5,
                "slo": {"ttft_s": 1.0, "latency_s": 3.0},
                "timeout_s": 6,
            }
        },
        **top,
    }
    return msgspec.convert(data, Scenario)


SHAPES = {
    "paged": small(),
    "contiguous": small({"mode": "contiguous", "kv_blocks": 256}),
    "chunked_attention": small({"max_num_batched_tokens": 256, "attend_s_per_token": 2e-6}),
    "cold_start": small(
        {"load_time_s": 4.0, "slow_start_s": 4.0, "slow_start_factor": 3.0},
        backend_wait="listening",
    ),
    "restart": small({"load_time_s": 2.0, "slow_start_s": 2.0}, restart_at_s=2.0),
}


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_bound_holds_over_the_clairvoyant_scheduler(shape: str, seed: int) -> None:
    scenario = SHAPES[shape].with_seed(seed)
    trace = plan(scenario)
    oracle = clairvoyant(scenario, trace)
    bound = upper_bound(scenario, trace)
    assert oracle.preemptions == 0
    assert 0 < oracle.tokens <= bound.tokens + 1e-6
    offered = sum(p.output_tokens for p in trace)
    assert bound.tokens < offered  # overloaded: not everything can be served


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_allocating_max_tokens_costs_the_scheduler_on_a_contiguous_backend_only(seed: int) -> None:
    for shape, costs in (("contiguous", True), ("paged", False)):
        scenario = SHAPES[shape].with_seed(seed)
        trace = plan(scenario)
        knows = clairvoyant(scenario, trace).tokens
        sent = clairvoyant(scenario, trace, as_sent=True)
        assert sent.preemptions == 0
        assert (sent.tokens < knows) if costs else (sent.tokens == knows)


def one(output: int, latency_s: float) -> tuple[Scenario, list[PlannedRequest]]:
    scenario = small({"time_scale": 1.0})
    tenant = msgspec.structs.replace(scenario.tenants["a"], slo=Slo(ttft_s=1, latency_s=latency_s))
    scenario = msgspec.structs.replace(scenario, tenants={"a": tenant})
    req = PlannedRequest(
        id=0,
        tenant="a",
        at_s=0.0,
        prompt_tokens=100,
        output_tokens=output,
        max_tokens=output,
        stream=False,
    )
    return scenario, [req]


def test_bound_of_one_request_is_its_tokens_only_when_it_can_finish_in_time() -> None:
    # 100 tokens need 100 steps of at least 0.0205 s: 2.05 s
    scenario, trace = one(100, 3.0)
    assert upper_bound(scenario, trace).tokens == pytest.approx(100)
    assert clairvoyant(scenario, trace).tokens == 100
    scenario, trace = one(100, 1.5)
    assert upper_bound(scenario, trace).tokens < 100
    assert clairvoyant(scenario, trace).tokens == 0


@pytest.mark.integration
@pytest.mark.slow
async def test_bound_and_oracle_hold_over_real_targets(tmp_path: Path) -> None:
    scenario = msgspec.structs.replace(SHAPES["paged"], limiter=LimiterSpec(limit=6))
    trace = plan(scenario)
    results, failed, _ = await run_targets(scenario, trace, tmp_path, ["direct", "limiter"])
    assert not failed
    summaries = summarise_all(scenario, results)
    bound = upper_bound(scenario, trace).tokens_per_s
    oracle = clairvoyant(scenario, trace).tokens_per_s
    assert bound >= oracle
    for name, summary in summaries.items():
        assert oracle >= summary.goodput_tokens_per_s > 0, name
