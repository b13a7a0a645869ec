"""The hostile-body benchmark's pure part: refusing one body of a million empty messages is
timed (the figure is the benchmark's, never a test threshold)."""

from __future__ import annotations

from loadtest.bench_hostile import _POLICY, parse_cost_ms


def test_the_refusal_of_a_hostile_body_is_timed() -> None:
    assert parse_cost_ms() > 0


def test_the_policy_it_runs_is_valid() -> None:
    from gateway.policy.compile import compile_policy
    from gateway.policy.loader import load_text

    text = _POLICY.format(port=1, admin=2, sim=3)
    policy = compile_policy(load_text(text), env={"BAD_KEY": "b", "GOOD_KEY": "g"})
    assert [s.rate_per_s for s in policy.buckets("bad", "m1")] == [1.0]
