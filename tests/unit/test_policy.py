"""Policy files: every shipped one loads; every invalid one fails with its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import PolicyError
from gateway.policy import units
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from gateway.policy.watcher import read_policy

ROOT = Path(__file__).resolve().parents[2] / "policies"
EXAMPLE_ENV = {
    "CHAT_FRONTEND_KEY": "k1",
    "BATCH_KEY_1": "k2",
    "BATCH_KEY_2": "k3",
    "QWEN_BACKEND_KEY": "k4",
}
MINIMAL = """
version: 1
models:
  m: {kv: {layers: 2, kv_heads: 2, head_dim: 64}, backends: [{url: "http://127.0.0.1:1"}]}
"""


@pytest.mark.parametrize("path", sorted(ROOT.glob("*.yaml")) + sorted(ROOT.glob("examples/*.yaml")))
def test_shipped_policies_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in EXAMPLE_ENV.items():
        monkeypatch.setenv(name, value)
    policy, _ = read_policy(path)
    assert policy.models
    assert len(policy.fingerprint) == 12


@pytest.mark.parametrize("path", sorted((ROOT / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_policies_fail_with_their_exact_message(path: Path) -> None:
    """Each ``# expect:`` line at the top of the file is one error, in the order of the file."""
    lines = path.read_text().splitlines()
    expected = [line.removeprefix("# expect: ") for line in lines if line.startswith("# expect: ")]
    assert expected, f"{path} says no error it must give"
    with pytest.raises(PolicyError) as caught:
        read_policy(path)
    assert str(caught.value).splitlines() == [f"{path}: {line}" for line in expected]


def test_missing_environment_variable_is_named() -> None:
    text = MINIMAL + "tenants:\n  a: {keys: [env:KVGATE_TEST_SURELY_UNSET]}\n"
    with pytest.raises(PolicyError, match="environment variable KVGATE_TEST_SURELY_UNSET"):
        compile_policy(load_text(text), env={})


def test_same_key_for_two_tenants_is_refused() -> None:
    text = MINIMAL + "tenants:\n  a: {keys: [env:K]}\n  b: {keys: [env:K]}\n"
    with pytest.raises(PolicyError, match="the same key is also 'a'"):
        compile_policy(load_text(text), env={"K": "secret"})


def test_keys_are_matched_by_digest_and_never_kept_in_plaintext() -> None:
    text = MINIMAL + "tenants:\n  a: {keys: [env:K]}\n"
    policy = compile_policy(load_text(text), env={"K": "secret"})
    assert policy.tenant_for_key("secret") is policy.tenants["a"]
    assert policy.tenant_for_key("Secret") is None
    assert "secret" not in repr(policy)


def test_buckets_apply_per_tenant_model_and_pool() -> None:
    text = (
        MINIMAL.replace(
            'backends: [{url: "http://127.0.0.1:1"}]}',
            'backends: [{url: "http://127.0.0.1:1"}], limits: [{unit: requests, rate: 100/s}]}',
        )
        + "  n: {kv: {layers: 2, kv_heads: 2, head_dim: 64}, backends: [{url: 'http://h:1'}]}\n"
        + "tenants:\n  a:\n    limits:\n"
        + "      - {unit: tokens, rate: 200k/min}\n"
        + "      - {unit: tokens, rate: 1M/day, model: n}\n"
    )
    policy = compile_policy(load_text(text))
    keys_m = [s.key for s in policy.buckets("a", "m")]
    keys_n = [s.key for s in policy.buckets("a", "n")]
    assert keys_m == ["t:a:*:tokens:60", "m:m:*:requests:1"]
    assert keys_n == ["t:a:*:tokens:60", "t:a:n:tokens:86400"]
    tokens = policy.buckets("a", "m")[0]
    assert tokens.rate_per_s == pytest.approx(200_000 / 60)
    assert tokens.burst == 200_000


def test_duplicate_limits_are_refused() -> None:
    text = (
        MINIMAL
        + "tenants:\n  a:\n    limits: [{unit: tokens, rate: 1k/s}, {unit: tokens, rate: 2k/s}]\n"
    )
    with pytest.raises(PolicyError, match="a second tokens limit over the same period"):
        compile_policy(load_text(text))


def test_empty_file_says_so() -> None:
    with pytest.raises(PolicyError, match="the file is empty"):
        load_text("  \n")


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8MiB", 8 * 2**20), ("18GiB", 18 * 2**30), ("500MB", 500 * 10**6), (1024, 1024)],
)
def test_sizes(text: str | int, expected: int) -> None:
    assert units.parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200/s", (200, 1)),
        ("200k/min", (200_000, 60)),
        ("1M/day", (1e6, 86400)),
        ("50/2h", (50, 7200)),
    ],
)
def test_rates(text: str, expected: tuple[float, float]) -> None:
    assert units.parse_rate(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"), [("30s", 30.0), ("100ms", 0.1), ("5m", 300.0), ("1h", 3600.0), (2, 2.0)]
)
def test_durations(text: str | float, expected: float) -> None:
    assert units.parse_duration(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("10%", 0.1), (0.25, 0.25), ("0.5", 0.5)])
def test_shares(text: str | float, expected: float) -> None:
    assert units.parse_share(text) == expected


@pytest.mark.parametrize(
    ("parse", "bad"),
    [
        (units.parse_size, "lots"),
        (units.parse_rate, "200 per minute"),
        (units.parse_duration, "soon"),
        (units.parse_share, "120%"),
    ],
)
def test_bad_units_say_what_was_expected(parse: object, bad: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse(bad)  # type: ignore[operator]
