"""Policies that cannot lose a limit: every number finite and bounded, duplicate keys and tabs
refused, every error of a file reported, bounded cost and bounded messages for hostile files,
secrets not needed to check a file, and a JSON Schema that agrees with the loader."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import PolicyError
from gateway.policy import units
from gateway.policy.compile import compile_policy
from gateway.policy.loader import MAX_POLICY_BYTES, PolicyErrors, load_text
from gateway.policy.watcher import read_policy

ROOT = Path(__file__).resolve().parents[2]
HEAD = """version: 1
models:
  m:
    kv: {layers: 2, kv_heads: 2, head_dim: 64}
    backends: [{url: "http://127.0.0.1:1"}]
"""
BIG = "1" + "0" * 400


def _error(text: str) -> str:
    with pytest.raises(PolicyError) as caught:
        load_text(text, "p.yaml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            HEAD + "tenants:\n  a: {limits: [{unit: requests, rate: 1/s, burst: 1.0e+400}]}\n",
            "p.yaml: line 7, at $.tenants.a.limits[0].burst: Expected `float` <= "
            "1000000000000000.0, got .inf (numbers must be finite)",
        ),
        (
            HEAD + f"tenants:\n  a: {{limits: [{{unit: requests, rate: {BIG}/s}}]}}\n",
            "p.yaml: line 7, at $.tenants.a.limits[0].rate: expected an amount between 0 and "
            "1e15 in '10000000000000000000000000000000000000… (403 characters)",
        ),
        (
            HEAD + "admission: {queue: {max_wait: .nan}}\n",
            "p.yaml: line 6, at $.admission.queue.max_wait: Expected `float` >= 0.0, "
            "got .nan (not a number)",
        ),
        (
            HEAD + "tenants: {a: {weight: .inf}}\n",
            "p.yaml: line 6, at $.tenants.a.weight: Expected `float` <= 1000000000000000.0, "
            "got .inf (numbers must be finite)",
        ),
        (
            HEAD.replace('1"}]', '1", probe_interval: .inf}]'),
            "p.yaml: line 5, at $.models.m.backends[0].probe_interval: Expected `float` <= "
            "31536000.0, got .inf (numbers must be finite)",
        ),
        (
            HEAD.replace('1"}]', f'1", kv_capacity: {"9" * 400}GiB}}]'),
            "p.yaml: line 5, at $.models.m.backends[0].kv_capacity: expected a size between 0 "
            "and 1PiB, got '99999999999999999999999999999999999999… (403 characters)",
        ),
        (
            HEAD + "admission: {headroom: .nan}\n",
            "p.yaml: line 6, at $.admission.headroom: Expected `float` >= 0.0, "
            "got .nan (not a number)",
        ),
        (
            HEAD + "tenants: {a: {max_wait: soon}}\n",
            "p.yaml: line 6, at $.tenants.a.max_wait: expected a duration like '30s', "
            "'100ms' or '5m', got 'soon'",
        ),
        (
            HEAD.replace("head_dim: 64", f"head_dim: {BIG}"),
            "p.yaml: line 4, at $.models.m.kv.head_dim: Expected `int` <= 2147483647, "
            "got a 401-digit number",
        ),
    ],
    ids=[
        "burst-1e400",
        "rate-400-digits",
        "max_wait-nan",
        "weight-inf",
        "probe_interval-inf",
        "size-400-digits",
        "share-nan",
        "tenant-max_wait-word",
        "int-400-digits",
    ],
)
def test_numbers_out_of_range_are_refused_where_they_are(text: str, expected: str) -> None:
    assert _error(text) == expected


numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**500), max_value=10**500),
)
FIELDS = [
    "tenants: {{a: {{limits: [{{unit: tokens, rate: 1k/s, burst: {}}}]}}}}",
    "tenants: {{a: {{weight: {}}}}}",
    "server: {{timeouts: {{idle: {}, total: {}}}}}",
    "admission: {{queue: {{max_wait: {}}}, headroom: {}}}",
    "server: {{max_body: {}}}",
]


@given(st.sampled_from(FIELDS), numbers, numbers)
def test_any_number_loads_finite_or_is_refused(field: str, first: float, second: float) -> None:
    scalars = (yaml.safe_dump(n).split("\n")[0] for n in (first, second))  # .nan, .inf, 1e+300
    text = HEAD + field.format(*scalars) + "\n"
    try:
        policy = compile_policy(load_text(text))
    except PolicyError as exc:
        message = str(exc)
    else:
        message = ""
    if message:
        assert "line " in message
        assert "$." in message
        assert len(message) < 300
        return
    server = policy.server
    values = [server.max_body_bytes, server.timeouts.idle_s, server.timeouts.total_s]
    values += [policy.max_wait_s, policy.admission.capacity.headroom]
    values += [t.weight for t in policy.tenants.values()]
    for spec in policy.buckets("a", "m") if "a" in policy.tenants else ():
        values += [spec.rate_per_s, spec.burst]
    assert all(math.isfinite(v) and v >= 0 for v in values)


def test_a_duplicate_tenant_is_refused_with_both_lines() -> None:
    text = HEAD + "tenants:\n  a:\n    limits: [{unit: requests, rate: 1/s}]\n  a: {}\n"
    assert _error(text) == (
        "p.yaml: line 9, at $.tenants.a: duplicate key `a`, first at line 7; "
        "YAML would keep only this one"
    )


def test_duplicates_are_found_at_every_depth_and_merge_keys_are_not_duplicates() -> None:
    text = (
        HEAD.replace("head_dim: 64}", "head_dim: 64, layers: 4}")
        + "common: &common {priority: critical}\n"
    )
    errors = _error(text).splitlines()
    assert errors[0].startswith("p.yaml: line 4, at $.models.m.kv.layers: duplicate key `layers`")
    merged = HEAD + "tenants:\n  base: &base {weight: 2}\n  a: {<<: *base, weight: 3}\n"
    assert load_text(merged).tenants["a"].weight == 3


def test_every_error_of_a_file_is_reported_in_file_order() -> None:
    text = (
        HEAD.replace("head_dim: 64", "head_dim: 0")
        + "store: {kind: mongo}\n"
        + "tenants:\n"
        + "  a: {priority: urgent, limits: [{unit: tokenz, rate: 1/s}]}\n"
        + "  b: {wieght: 2}\n"
    )
    with pytest.raises(PolicyErrors) as caught:
        load_text(text, "p.yaml")
    assert [line.split(",")[0][len("p.yaml:") :] for line in str(caught.value).splitlines()] == [
        " line 4",
        " line 6",
        " line 8",
        " line 8",
        " line 9",
    ]
    assert "$.store.kind: unknown value 'mongo'; expected one of: memory, redis" in str(
        caught.value
    )
    assert "unknown key `wieght`; did you mean `weight`?" in str(caught.value)
    assert len(caught.value.details) == 5


def test_a_missing_key_is_named_with_the_others() -> None:
    text = "version: 1\nmodels:\n  m: {kv: {layers: 2, kv_heads: 2, head_dim: 64}}\n"
    assert _error(text) == "p.yaml: line 3, at $.models.m: missing required key `backends`"


def test_a_tab_is_explained() -> None:
    assert _error(HEAD + "tenants:\n\ta: {}\n") == (
        "p.yaml: line 7, column 1: a tab character; YAML indents with spaces only "
        "(replace the tab with spaces)"
    )


def test_a_huge_value_is_quoted_as_a_short_excerpt() -> None:
    text = HEAD + f"tenants: {{a: {{priority: {'x' * 1_000_000}}}}}\n"
    message = _error(text)
    assert message.startswith("p.yaml: line 6, at $.tenants.a.priority: Invalid enum value 'xxx")
    assert len(message) < 300


def test_an_alias_bomb_is_refused_without_being_expanded() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    assert _error("\n".join(lines) + "\n") == (
        "p.yaml: anchors and aliases expand to more than 2000000 values"
    )


def test_a_file_over_the_cap_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(HEAD + "# " + "x" * MAX_POLICY_BYTES + "\n: [unclosed\n")
    with pytest.raises(PolicyError) as caught:
        read_policy(path)
    assert str(caught.value) == f"{path}: the file is 8.0 MiB; policies are limited to 8 MiB"


def test_a_file_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(HEAD.encode() + b"tenants: {caf\xe9: {}}\n")
    with pytest.raises(PolicyError, match=r"line 6: not UTF-8 \(byte \d+\)"):
        read_policy(path)


def test_offline_checks_a_file_without_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(HEAD + "tenants: {a: {keys: [env:KVGATE_TEST_SURELY_UNSET]}}\n")
    with pytest.raises(PolicyError, match="environment variable KVGATE_TEST_SURELY_UNSET"):
        read_policy(path)
    policy, _ = read_policy(path, offline=True)
    assert policy.tenant_for_key("") is None
    path.write_text(HEAD + "tenants: {a: {keys: [env:KVGATE_X]}, b: {keys: [env:KVGATE_X]}}\n")
    with pytest.raises(PolicyError, match=r"line 6, at \$.tenants.b.keys\[0\]: the same key"):
        read_policy(path, offline=True)


@pytest.mark.parametrize(
    ("parse", "bad"),
    [
        (units.parse_duration, math.nan),
        (units.parse_duration, math.inf),
        (units.parse_amount, -math.inf),
        (units.parse_amount, 10**400),
        (units.parse_share, math.nan),
        (units.parse_size, 2**60),
        (units.parse_rate, "5/0s"),
        (units.parse_duration, "9" * 400),
    ],
)
def test_unit_parsers_refuse_what_is_not_finite_and_bounded(parse: object, bad: object) -> None:
    with pytest.raises(ValueError, match="expected"):
        parse(bad)  # type: ignore[operator]


def test_the_json_schema_accepts_the_shipped_policies_and_refuses_bad_numbers() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "schema"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    document = json.loads(out)
    validator = jsonschema.Draft202012Validator(document)
    shipped = [*ROOT.glob("policies/*.yaml"), *ROOT.glob("policies/examples/*.yaml")]
    for path in shipped:
        assert not list(validator.iter_errors(yaml.safe_load(path.read_text()))), path
    # JSON has no NaN, so its schema cannot refuse one: that stays with the loader.
    for name in ("infinite_timeouts", "oversized_number", "unknown_enum"):
        data = yaml.safe_load((ROOT / "policies" / "invalid" / f"{name}.yaml").read_text())
        assert list(validator.iter_errors(data)), name


def test_a_file_with_many_errors_lists_the_first_fifty_and_counts_the_rest() -> None:
    tenants = "".join(f"  t{i}: {{priority: urgent}}\n" for i in range(60))
    with pytest.raises(PolicyErrors) as caught:
        load_text(HEAD + "tenants:\n" + tenants, "p.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == 51
    assert lines[0].startswith("p.yaml: line 7, at $.tenants.t0.priority: Invalid enum value")
    assert lines[-1] == "p.yaml: ... and 10 more errors"
    assert len(caught.value.details) == 60


@pytest.mark.parametrize(
    "text",
    ["[" * 1_000_000 + "]" * 1_000_000, "version: 1\nmodels: " + "{a: " * 200 + "1" + "}" * 200],
    ids=["flow-a-million-deep", "mapping-200-deep"],
)
def test_deep_nesting_is_refused_before_the_composer_recurses(text: str) -> None:
    """libyaml's C composer overflows the stack at a few tens of thousands of levels: the
    process would die instead of raising."""
    assert _error(text).endswith(": nested more than 100 deep")


def test_a_huge_key_is_cut_in_the_path_too() -> None:
    name = "t" * 1000  # YAML caps an implicit key at 1024 characters
    message = _error(HEAD + f"tenants: {{{name}: {{weight: 0}}}}\n")
    assert (
        message == f"p.yaml: line 6, at $.tenants.{'t' * 39}….weight: Expected `float` > 0.0, got 0"
    )
