"""Backend life cycle: loading -> warming -> ready, ejection, load-time prediction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.backend import BackendConfig, MemoryKind, ReserveMode, Signals
from gateway.core.clock import FakeClock
from gateway.core.lifecycle import Health, Lifecycle
from gateway.core.types import Phase


def make(clock: FakeClock, *, warmup_s: float = 10.0, floor: float = 0.1) -> Lifecycle:
    return Lifecycle(
        warmup_s=warmup_s,
        floor=floor,
        eject_failures=3,
        cooldown_s=5.0,
        expected_load_s=45.0,
        now=clock.now(),
    )


def test_healthy_at_first_look_is_ready_at_once() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    assert lc.phase is Phase.READY
    assert lc.capacity_factor(clock.now()) == 1.0


def test_observed_load_warms_from_the_floor_by_what_the_backend_serves() -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=10.0, floor=0.1)
    lc.observe_health(Health.LOADING, clock.now())
    assert lc.capacity_factor(clock.now()) == 0.0
    clock.advance(20.0)
    lc.observe_health(Health.OK, clock.now())
    assert lc.phase is Phase.WARMING
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)
    clock.advance(5.0)  # time alone moves nothing: the backend has shown nothing yet
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)
    lc.kept_up(used=0.9, now=clock.now())  # kept up, but how fast it serves is not known
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)
    lc.first_token(2.0, clock.now())  # its first answer: now it has been measured
    lc.kept_up(used=0.2, now=clock.now())  # kept up, but with little asked of it
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)
    for expected in (0.2, 0.4, 0.8):  # slow start: doubling per scrape that kept up, used
        lc.kept_up(used=0.9, now=clock.now())
        assert lc.capacity_factor(clock.now()) == pytest.approx(expected)
    lc.kept_up(used=0.9, now=clock.now())
    assert lc.phase is Phase.READY
    assert lc.capacity_factor(clock.now()) == 1.0


def test_warming_ends_after_warmup_s_at_the_latest() -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=10.0, floor=0.1)
    lc.observe_health(Health.LOADING, clock.now())
    lc.observe_health(Health.OK, clock.now())
    assert lc.next_change_at(clock.now()) == pytest.approx(clock.now() + 10.0)
    clock.advance(10.0)
    assert lc.capacity_factor(clock.now()) == 1.0
    assert lc.phase is Phase.READY


def test_a_backend_that_falls_behind_is_cut_then_grows_additively() -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=60.0, floor=0.1)
    lc.observe_health(Health.LOADING, clock.now())
    lc.observe_health(Health.OK, clock.now())
    lc.first_token(1.0, clock.now())
    for _ in range(3):
        lc.kept_up(used=1.0, now=clock.now())
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.8)
    lc.fell_behind(clock.now())
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.56)
    lc.fell_behind(clock.now())  # the same burst, within the cool-down: counted once
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.56)
    lc.kept_up(used=1.0, now=clock.now())
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.66)
    clock.advance(1.0)
    lc.record_failure(clock.now())  # a failure there is falling behind too
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.462)


def test_a_slow_first_token_after_a_restart_cuts_against_the_warm_one() -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=60.0, floor=0.1)
    lc.observe_health(Health.OK, clock.now())  # ready at first look
    for _ in range(20):
        lc.first_token(0.5, clock.now())  # the warm reference
    lc.observe_health(Health.LOADING, clock.now())  # restarted
    clock.advance(10.0)
    lc.observe_health(Health.OK, clock.now())
    for _ in range(3):  # the warm reference measures it: it may grow before its first answer
        lc.kept_up(used=1.0, now=clock.now())
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.8)
    lc.first_token(1.2, clock.now())  # slower than warm, as a fresh server is: no cut
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.8)
    lc.first_token(2.0, clock.now())  # four times the warm one: flooded
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.56)


def test_load_time_is_learned_and_predicts_the_next_load() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.LOADING, clock.now())
    # never seen a load finish: the policy's expectation predicts the first
    assert lc.predicted_ready_at(clock.now()) == pytest.approx(clock.now() + 45.0)
    clock.advance(30.0)
    lc.observe_health(Health.OK, clock.now())
    assert lc.load_estimate_s == pytest.approx(30.0)
    assert lc.last_load_error_s == pytest.approx(15.0)  # predicted 45 s, took 30 s
    clock.advance(100.0)
    lc.observe_health(Health.LOADING, clock.now())  # restarted
    start = clock.now()
    clock.advance(10.0)
    assert lc.predicted_ready_at(clock.now()) == pytest.approx(start + 30.0)
    clock.advance(40.0)  # overdue: another quarter of the usual time
    assert lc.predicted_ready_at(clock.now()) == pytest.approx(clock.now() + 7.5)


def test_consecutive_failures_eject_then_cooldown_warms_again() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    lc.record_failure(clock.now())
    lc.record_failure(clock.now())
    lc.record_success()
    lc.record_failure(clock.now())
    assert lc.phase is Phase.READY  # not consecutive
    lc.record_failure(clock.now())
    lc.record_failure(clock.now())
    assert lc.phase is Phase.EJECTED
    assert lc.capacity_factor(clock.now()) == 0.0
    assert lc.predicted_ready_at(clock.now()) == pytest.approx(clock.now() + 5.0)
    clock.advance(5.0)
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)
    assert lc.phase is Phase.WARMING


def test_ejected_backend_that_is_down_after_cooldown_goes_loading() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    for _ in range(3):
        lc.observe_health(Health.FAILED, clock.now())
    assert lc.phase is Phase.EJECTED
    lc.observe_health(Health.LOADING, clock.now())
    clock.advance(6.0)
    lc.advance(clock.now())
    assert lc.phase is Phase.LOADING


def test_a_backend_that_restarted_while_ejected_warms_without_the_cooldown() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    for _ in range(3):
        lc.record_failure(clock.now())  # its streams broke: it crashed
    assert lc.phase is Phase.EJECTED
    lc.observe_health(Health.LOADING, clock.now())  # refused: a new process is starting
    assert lc.phase is Phase.LOADING
    clock.advance(0.5)
    lc.observe_health(Health.OK, clock.now())
    assert lc.phase is Phase.WARMING  # long before the 5 s cool-down would have ended
    assert lc.capacity_factor(clock.now()) == pytest.approx(0.1)


def test_a_backend_that_answers_but_fails_serves_its_cooldown() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    for _ in range(3):
        lc.record_failure(clock.now())
    clock.advance(1.0)
    lc.observe_health(Health.OK, clock.now())
    assert lc.phase is Phase.EJECTED
    clock.advance(4.0)
    assert lc.serving(clock.now())  # the cool-down ended: it warms again


def test_nothing_listening_stops_traffic_at_once_and_teaches_no_load_time() -> None:
    clock = FakeClock()
    lc = make(clock)
    lc.observe_health(Health.OK, clock.now())
    lc.went_down(clock.now())
    assert not lc.serving(clock.now())
    assert lc.predicted_ready_at(clock.now()) == pytest.approx(clock.now() + 45.0)
    clock.advance(0.3)
    lc.observe_health(Health.OK, clock.now())  # back before a probe ever saw it down
    assert lc.phase is Phase.WARMING
    assert lc.load_estimate_s is None  # 0.3 s is no measurement of a load


def test_zero_warmup_goes_straight_to_ready() -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=0.0)
    lc.observe_health(Health.LOADING, clock.now())
    clock.advance(1.0)
    lc.observe_health(Health.OK, clock.now())
    assert lc.phase is Phase.READY


@given(
    floor=st.floats(0.0, 1.0),
    events=st.lists(
        st.tuples(st.sampled_from(["time", "kept_up", "fell_behind", "ttft"]), st.floats(0, 3)),
        min_size=1,
        max_size=30,
    ),
)
def test_warming_factor_stays_between_floor_and_one(
    floor: float, events: list[tuple[str, float]]
) -> None:
    clock = FakeClock()
    lc = make(clock, warmup_s=10.0, floor=floor)
    lc.first_token(0.5, clock.now())  # loading: no reference learned
    lc.observe_health(Health.LOADING, clock.now())
    lc.observe_health(Health.OK, clock.now())
    for kind, x in events:
        if kind == "time":
            clock.advance(x)
        elif kind == "kept_up":
            lc.kept_up(used=x / 3.0, now=clock.now())
        elif kind == "fell_behind":
            lc.fell_behind(clock.now())
        else:
            lc.first_token(x, clock.now())
        f = lc.capacity_factor(clock.now())
        if lc.phase is Phase.WARMING:
            assert floor - 1e-12 <= f <= 1.0
        else:
            assert lc.phase is Phase.READY
            assert f == 1.0


def test_reserve_defaults_follow_memory_kind() -> None:
    assert BackendConfig(url="u").reserve_mode is ReserveMode.LIKELY
    contiguous = BackendConfig(url="u", memory=MemoryKind.CONTIGUOUS)
    assert contiguous.reserve_mode is ReserveMode.WORST_CASE
    llama = BackendConfig(url="u", signals=Signals.LLAMACPP)
    assert llama.memory_kind is MemoryKind.SLOTS
    assert llama.reserve_mode is ReserveMode.WORST_CASE
    assert BackendConfig(url="u", reserve=ReserveMode.WORST_CASE).reserve_mode is (
        ReserveMode.WORST_CASE
    )


def test_api_key_is_not_in_repr() -> None:
    assert "s3cret" not in repr(BackendConfig(url="u", api_key="s3cret"))
