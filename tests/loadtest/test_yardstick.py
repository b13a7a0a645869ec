"""The yardstick: the LP bound holds over the clairvoyant scheduler, which never preempts, on
small traces of every backend shape (prefix caching with shared system prompts included), and
over a FIFO replay on the engine; and both over real targets run on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.sim.engine import Engine
from loadtest.bound import shareable_blocks, upper_bound
from loadtest.compare import run_targets, summarise_all
from loadtest.generator import PlannedRequest, block_hashes, plan
from loadtest.oracle import clairvoyant
from loadtest.scenario import LimiterSpec, Scenario, Slo, load_scenario

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


def shared_prefixes(scenario: Scenario, tokens: int = 300, prefixes: int = 2) -> Scenario:
    """``scenario`` with every request opening with one of ``prefixes`` system prompts."""
    tenant = msgspec.structs.replace(
        scenario.tenants["a"], shared_prefix_tokens=tokens, shared_prefixes=prefixes
    )
    return msgspec.structs.replace(scenario, tenants={"a": tenant})


SHAPES = {
    "paged": small(),
    "prefix_cache": shared_prefixes(small({"prefix_caching": True})),
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


def fifo_replay(scenario: Scenario, planned: list[PlannedRequest]) -> int:
    """SLO-met output tokens when every request goes to the engine as it arrives (what the
    direct target does, without the network): a real schedule, so below the bound."""
    cfg = scenario.backend
    engine = Engine(cfg, start_s=-cfg.load_time_s)
    slo = scenario.tenants["a"].slo
    order = sorted(planned, key=lambda p: p.at_s)
    end = scenario.duration_s + scenario.drain_timeout_s
    sent: dict[int, PlannedRequest] = {}
    first: dict[int, float] = {}
    good = nxt = 0
    while engine.now < end and (nxt < len(order) or engine.has_work()):
        while nxt < len(order) and order[nxt].at_s <= engine.now:
            req = order[nxt]
            hashes = block_hashes(scenario, req)
            sent[engine.submit(req.prompt_tokens, req.max_tokens, req.output_tokens, hashes)] = req
            nxt += 1
        if not engine.has_work():
            engine.advance_to(order[nxt].at_s)
            continue
        step = engine.step()
        at = step.start_s + step.duration_s
        for seq in step.tokens:
            first.setdefault(seq, at)
        for seq, _ in step.finished:
            req = sent[seq]
            late = at - req.at_s > slo.latency_s or at > end
            if not late and not (req.stream and first[seq] - req.at_s > slo.ttft_s):
                good += req.output_tokens
    return good


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("shape", ["paged", "prefix_cache"])
def test_bound_and_oracle_hold_over_a_fifo_replay(shape: str, seed: int) -> None:
    scenario = SHAPES[shape].with_seed(seed)
    trace = plan(scenario)
    assert upper_bound(scenario, trace).tokens >= clairvoyant(scenario, trace).tokens
    assert clairvoyant(scenario, trace).tokens >= fifo_replay(scenario, trace) > 0


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_prefix_caching_relaxes_the_bound_only_for_blocks_prompts_share(seed: int) -> None:
    cached = SHAPES["prefix_cache"].with_seed(seed)
    uncached = msgspec.structs.replace(
        cached, backend=msgspec.structs.replace(cached.backend, prefix_caching=False)
    )
    trace = plan(cached)
    shareable = shareable_blocks(cached, trace)
    # two system prompts of 300 tokens, 296 of text: 1184 characters, 18 full blocks of 64; the
    # 19th holds the request's own text too, so it is nobody else's
    assert set(shareable.values()) == {18}
    assert set(shareable_blocks(uncached, trace).values()) == {0}
    assert upper_bound(cached, trace).tokens > upper_bound(uncached, trace).tokens
    assert clairvoyant(cached, trace).tokens > clairvoyant(uncached, trace).tokens
    # caching on, but every prompt its own: nothing is shared and the bound is as without
    unique = small({"prefix_caching": True}).with_seed(seed)
    unique_trace = plan(unique)
    assert set(shareable_blocks(unique, unique_trace).values()) == {0}
    assert (
        upper_bound(unique, unique_trace).tokens
        == upper_bound(small().with_seed(seed), unique_trace).tokens
    )


def test_the_prefix_cache_scenario_shares_its_system_prompts_only() -> None:
    path = Path(__file__).parents[2] / "loadtest" / "scenarios" / "prefix_cache.yaml"
    scenario = load_scenario(path)
    assert (scenario.backend.mode, scenario.backend.prefix_caching) == ("paged", True)
    trace = plan(scenario)
    shareable = shareable_blocks(scenario, trace)
    by_tenant = {
        name: {shareable[p.id] for p in trace if p.tenant == name} for name in scenario.tenants
    }
    # 1500 and 2500 tokens, 4 of them framing, in 64-character blocks
    assert by_tenant == {"acme": {1496 * 4 // 64}, "globex": {2496 * 4 // 64}, "initech": {0}}
    assert {p.prefix for p in trace if p.tenant == "globex"} == {0, 1}


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
@pytest.mark.parametrize("shape", ["paged", "prefix_cache"])
async def test_bound_and_oracle_hold_over_real_targets(tmp_path: Path, shape: str) -> None:
    scenario = msgspec.structs.replace(SHAPES[shape], limiter=LimiterSpec(limit=6))
    trace = plan(scenario)
    results, failed, _ = await run_targets(scenario, trace, tmp_path, ["direct", "limiter"])
    assert not failed
    summaries = summarise_all(scenario, results)
    bound = upper_bound(scenario, trace).tokens_per_s
    oracle = clairvoyant(scenario, trace).tokens_per_s
    assert bound >= oracle
    for name, summary in summaries.items():
        assert oracle >= summary.goodput_tokens_per_s > 0, name
