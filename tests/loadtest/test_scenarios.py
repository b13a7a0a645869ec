"""Every shipped scenario decodes, draws a trace within its bounds, and yields gateway policies
that the gateway's own schema accepts; bad scenario files fail with the file and the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.policy.loader import load_text
from loadtest.compare import trace_shape
from loadtest.generator import plan
from loadtest.scenario import ScenarioError, load_scenario
from loadtest.targets import build_policy, key_hash

SCENARIOS = sorted((Path(__file__).parents[2] / "loadtest" / "scenarios").glob("*.yaml"))
REQUIRED = {"overload", "bursty", "long_context", "cold_start", "fragmentation", "restart"}
# Three targets, each a fresh simulator (+ gateway) and the run itself, within two minutes.
MAX_RUN_S = 40.0


def test_the_six_scenarios_are_shipped() -> None:
    assert {path.stem for path in SCENARIOS} >= REQUIRED


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_decodes_and_fits_its_bounds(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.name == path.stem
    assert scenario.duration_s + scenario.drain_timeout_s <= MAX_RUN_S
    trace = plan(scenario)
    assert 100 <= len(trace) <= min(scenario.max_requests, 2000)
    context = scenario.backend.kv_blocks * scenario.backend.block_size
    assert all(p.prompt_tokens + p.max_tokens <= context for p in trace)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_gateway_policies_load(path: Path) -> None:
    scenario = load_scenario(path)
    for target in ("count_limited", "kvgate"):
        policy = build_policy(scenario, target, "http://127.0.0.1:9", 8080)
        loaded = load_text(yaml.safe_dump(policy), f"{path.stem}/{target}")
        assert loaded.models[scenario.model].backends[0].url == "http://127.0.0.1:9"
        for name, tenant in scenario.tenants.items():
            assert loaded.tenants[name].keys == [key_hash(tenant.key)]
        if target == "count_limited":
            assert loaded.admission.enabled is False
            units = {limit.unit for t in loaded.tenants.values() for limit in t.limits}
            units |= {limit.unit for limit in loaded.models[scenario.model].limits}
            assert units <= {"requests"}
        else:
            assert loaded.admission.enabled is True


def test_overload_is_about_three_times_the_ceiling() -> None:
    scenario = load_scenario(next(p for p in SCENARIOS if p.stem == "overload"))
    trace = plan(scenario)
    offered = sum(p.output_tokens for p in trace) / scenario.duration_s
    assert 2.5 <= offered / trace_shape(scenario, trace).ceiling_tokens_per_s <= 3.5


def test_special_scenarios_set_what_they_are_about() -> None:
    by_name = {p.stem: load_scenario(p) for p in SCENARIOS}
    assert by_name["fragmentation"].backend.mode == "contiguous"
    assert by_name["cold_start"].backend_wait == "listening"
    assert by_name["cold_start"].backend.load_time_s > 0
    assert by_name["restart"].restart_at_s is not None


BASE = """
name: bad
description: x
duration_s: 5
tenants:
  t:
    key: sk-test-0000
    arrivals: [{kind: poisson, rate_per_s: 1}]
    prompt_tokens: {kind: fixed, value: 10}
    output_tokens: {kind: fixed, value: 10}
    max_tokens: {kind: fixed, value: 10}
    slo: {ttft_s: 1, latency_s: 2}
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour: blue\n", "Object contains unknown field `colour`"),
        (
            "gateway: {count_limited: {tenants: {t: {limits: [{unit: tokens, rate: 1k/s}]}}}}\n",
            "only use requests limits",
        ),
        ("gateway: {kvgate: {tenants: {nobody: {}}}}\n", "unknown tenants: ['nobody']"),
        ("restart_at_s: 9\n", "restart_at_s must fall inside duration_s"),
    ],
)
def test_bad_scenarios_name_file_and_problem(tmp_path: Path, extra: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + extra)
    with pytest.raises(ScenarioError, match=r"bad\.yaml") as caught:
        load_scenario(path)
    assert message in str(caught.value)


def test_bad_distribution_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        BASE.replace(
            "{kind: fixed, value: 10}\n    max", "{kind: uniform, low: 9, high: 3}\n    max", 1
        )
    )
    with pytest.raises(ScenarioError, match=r"high \(3\) < low \(9\)"):
        load_scenario(path)
