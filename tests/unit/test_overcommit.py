"""The overcommit factor of a paged backend: grows while the gateway is bound by its own
reservations and the backend's gauge shows room, never while requests wait inside the backend,
and shrinks on preemptions and on usage above target."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.overcommit import Overcommit

BOUND = {"target": 0.9, "reserved_share": 1.0, "preempted": False}


def test_grows_while_bound_by_reservations_and_usage_is_low() -> None:
    oc = Overcommit(probing=False)
    for _ in range(5):
        oc.observe(usage=0.4, **BOUND)  # type: ignore[arg-type]
    assert abs(oc.value - 1.5) < 1e-9


def test_slow_start_multiplies_until_the_first_step_down_then_adds() -> None:
    oc = Overcommit()
    for _ in range(3):
        oc.observe(usage=0.4, **BOUND)  # type: ignore[arg-type]
    assert abs(oc.value - 1.25**3) < 1e-9
    oc.observe(usage=0.95, **BOUND)  # type: ignore[arg-type]  # above target: one step down
    assert not oc.probing
    after = oc.value
    oc.observe(usage=0.4, **BOUND)  # type: ignore[arg-type]
    assert abs(oc.value - (after + oc.step)) < 1e-9


def test_a_preemption_ends_slow_start() -> None:
    oc = Overcommit()
    oc.observe(usage=0.4, **BOUND)  # type: ignore[arg-type]
    oc.observe(usage=0.4, target=0.9, reserved_share=1.0, preempted=True)
    assert not oc.probing
    assert abs(oc.value - 1.0) < 1e-9


def test_does_not_grow_while_requests_wait_inside_the_backend() -> None:
    # a prefill-bound server: its gauge is low only because the requests have not started
    oc = Overcommit()
    for _ in range(5):
        oc.observe(usage=0.1, backend_queue=True, **BOUND)  # type: ignore[arg-type]
    assert oc.value == 1.0


def test_does_not_grow_when_the_gateway_is_not_the_bound() -> None:
    oc = Overcommit()
    oc.observe(usage=0.1, target=0.9, reserved_share=0.5, preempted=False)
    assert oc.value == 1.0


def test_a_preemption_cuts_and_usage_above_target_steps_down() -> None:
    oc = Overcommit(value=2.0)
    oc.observe(usage=0.5, target=0.9, reserved_share=1.0, preempted=True)
    assert oc.value == 1.6
    oc.observe(usage=0.95, target=0.9, reserved_share=1.0, preempted=False)
    assert abs(oc.value - 1.5) < 1e-9


@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 2), st.booleans(), st.booleans()), max_size=60)
)
def test_the_factor_stays_between_one_and_its_maximum(
    scrapes: list[tuple[float, float, bool, bool]],
) -> None:
    oc = Overcommit()
    for usage, share, preempted, queued in scrapes:
        oc.observe(
            usage=usage,
            target=0.9,
            reserved_share=share,
            preempted=preempted,
            backend_queue=queued,
        )
        assert 1.0 <= oc.value <= oc.max_factor
