"""The overhead benchmark's policies: each step of the ladder compiles and switches off what
its name says (the benchmark itself needs wrk and pinned cores, so it is not run here)."""

from __future__ import annotations

import pytest

from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from loadtest.bench_overhead import _LADDER, _POLICY


@pytest.mark.parametrize(("name", "settings"), _LADDER, ids=[name for name, _ in _LADDER])
def test_ladder_policies_switch_off_what_they_name(name: str, settings: dict[str, str]) -> None:
    spec = load_text(_POLICY.format(port=1, backend=2, **settings))
    policy = compile_policy(spec)
    assert spec.server.access_log is ("no access log" not in name)
    assert spec.admission.enabled is ("no admission" not in name)
    assert bool(policy.buckets("bench", "bench")) is ("no limits" not in name)
