"""The numbers of a real-backend benchmark run, computed from its files alone: per-request
records and scrapes of the server's (and kvgate's) ``/metrics``; the summary per target, medians
over repeats, and the markdown table with ratios against going direct.

Definitions:
- every prompt starts with a tag unique to its run and request, so a server's prefix cache
  never shares blocks between requests or between the targets of one invocation;
- output lengths are fixed: ``max_tokens`` is the drawn output length and ``ignore_eos`` is
  sent (vLLM and llama.cpp accept it), so every target is asked for the same tokens;
- *throughput*: output tokens of successful requests per second of the target's own makespan
  (first scheduled send to last answer);
- *goodput*: output tokens of requests that met the SLO (success, end-to-end latency and TTFT
  within bounds, both from the scheduled time) per second of one horizon shared by the targets
  of a repeat (the longest makespan among them), so a target that sheds is not paid for ending
  early;
- *TTFT*, *ITL*: time to the first content event from the scheduled time; gaps between content
  events of one stream, pooled over the run (events read together give zero gaps, so also
  *TPOT*: a request's time from first to last token per output token after the first);
  nearest-rank percentiles over successful requests;
- *preemptions*: increase of the server's counter over the run; *waiting max*: the largest
  waiting-queue gauge seen (sampled every ``--sample-every`` seconds).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from loadtest.records import Result
from loadtest.scenario import Slo

Flavor = Literal["vllm", "llamacpp"]


# Server metric names per flavor: (preemption counter, waiting gauge, running gauge, kv share).
SERVER_METRICS: dict[Flavor, tuple[str | None, str, str, str | None]] = {
    "vllm": (
        "vllm:num_preemptions_total",
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ),
    "llamacpp": (None, "llamacpp:requests_deferred", "llamacpp:requests_processing", None),
}


class Record(msgspec.Struct, kw_only=True):
    """One request as the client saw it; times in seconds from the run's start."""

    id: int
    scheduled_s: float
    status: int = 0
    result: Result = Result.UNFINISHED
    error: str | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    gaps_s: list[float] = []
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    retry_after_s: float | None = None

    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    def latency_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.scheduled_s

    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: robust to events that arrive together
        in one read, which make single gaps zero."""
        n = self.output_tokens
        if self.first_token_s is None or self.done_s is None or n is None or n < 2:
            return None
        return (self.done_s - self.first_token_s) / (n - 1)

    def within(self, slo_ttft_s: float, slo_latency_s: float) -> bool:
        ttft, latency = self.ttft_s(), self.latency_s()
        return (
            self.result is Result.OK
            and ttft is not None
            and latency is not None
            and ttft <= slo_ttft_s
            and latency <= slo_latency_s
        )


class ServerSample(msgspec.Struct, kw_only=True, frozen=True):
    t_s: float
    values: dict[str, float]


class Summary(msgspec.Struct, kw_only=True):
    requests: int
    ok: int
    within_slo: int
    shed: int
    errors: int  # every failure other than a 503 shed
    output_tokens: int
    goodput_tokens: int
    makespan_s: float
    throughput_tokens_per_s: float
    goodput_tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p90_s: float | None
    itl_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p99_s: float | None
    latency_p50_s: float | None
    latency_p99_s: float | None
    preemptions: float | None
    waiting_max: float | None
    running_max: float | None
    kv_usage_max: float | None
    extra: dict[str, float] = {}  # target-specific figures (kvgate's queue wait, the limit)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: the smallest value with at least ``q`` of the sample at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def parse_metrics(text: str, names: Sequence[str]) -> dict[str, float]:
    """The sum over every series of each sample name in ``names`` that the text has (vLLM labels
    each series by engine and model; a sum is the server's total)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def counter_increase(samples: Sequence[ServerSample], name: str) -> float | None:
    """Increase of a counter over the samples; a drop (server restart) starts a new run."""
    seen = [s.values[name] for s in samples if name in s.values]
    if not seen:
        return None
    total = 0.0
    for before, after in itertools.pairwise(seen):
        total += after - before if after >= before else after
    return total


def gauge_max(samples: Sequence[ServerSample], name: str | None) -> float | None:
    seen = [s.values[name] for s in samples if name is not None and name in s.values]
    return max(seen) if seen else None


def summarise(
    records: Sequence[Record],
    samples: Sequence[ServerSample],
    flavor: Flavor,
    slo: Slo,
    horizon_s: float | None = None,
) -> Summary:
    """The numbers of one target's run. ``horizon_s`` divides goodput (default: the makespan)."""
    ok = [r for r in records if r.result is Result.OK]
    good = [r for r in ok if r.within(slo.ttft_s, slo.latency_s)]
    start = min((r.scheduled_s for r in records), default=0.0)
    end = max((r.done_s for r in records if r.done_s is not None), default=start)
    makespan = max(end - start, 1e-9)
    horizon = makespan if horizon_s is None else max(horizon_s, 1e-9)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    good_tokens = sum(r.output_tokens or 0 for r in good)
    ttfts = [t for r in ok if (t := r.ttft_s()) is not None]
    lats = [t for r in ok if (t := r.latency_s()) is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tpots = [t for r in ok if (t := r.tpot_s()) is not None]
    preempt, waiting, running, kv = SERVER_METRICS[flavor]
    shed = sum(1 for r in records if r.result is Result.SHED)
    return Summary(
        requests=len(records),
        ok=len(ok),
        within_slo=len(good),
        shed=shed,
        errors=len(records) - len(ok) - shed,
        output_tokens=out_tokens,
        goodput_tokens=good_tokens,
        makespan_s=makespan,
        throughput_tokens_per_s=out_tokens / makespan,
        goodput_tokens_per_s=good_tokens / horizon,
        ttft_p50_s=percentile(ttfts, 0.5),
        ttft_p90_s=percentile(ttfts, 0.9),
        ttft_p99_s=percentile(ttfts, 0.99),
        itl_p50_s=percentile(gaps, 0.5),
        itl_p90_s=percentile(gaps, 0.9),
        itl_p99_s=percentile(gaps, 0.99),
        tpot_p50_s=percentile(tpots, 0.5),
        tpot_p99_s=percentile(tpots, 0.99),
        latency_p50_s=percentile(lats, 0.5),
        latency_p99_s=percentile(lats, 0.99),
        preemptions=None if preempt is None else counter_increase(samples, preempt),
        waiting_max=gauge_max(samples, waiting),
        running_max=gauge_max(samples, running),
        kv_usage_max=gauge_max(samples, kv),
    )


def median_summary(runs: Sequence[Summary]) -> dict[str, float | None]:
    """Per field, the median over runs of the values that are present."""
    out: dict[str, float | None] = {}
    for name in Summary.__struct_fields__:
        if name == "extra":
            continue
        present = [float(v) for run in runs if (v := getattr(run, name)) is not None]
        out[name] = statistics.median(present) if present else None
    keys = sorted({k for run in runs for k in run.extra})
    for key in keys:
        present = [run.extra[key] for run in runs if key in run.extra]
        out[key] = statistics.median(present)
    return out


# Rows of the table: (label, field, format, whether a ratio to direct is shown).
_ROWS: tuple[tuple[str, str, str, bool], ...] = (
    ("requests ok / within SLO / shed / errors", "", "", False),
    ("goodput (SLO-met tok/s)", "goodput_tokens_per_s", "{:.0f}", True),
    ("throughput (tok/s)", "throughput_tokens_per_s", "{:.0f}", True),
    ("makespan (s)", "makespan_s", "{:.1f}", True),
    ("TTFT p50 / p90 / p99 (s)", "ttft", "{:.2f}", True),
    ("ITL gaps p50 / p90 / p99 (ms)", "itl", "{:.0f}", True),
    ("TPOT p50 / p99 (ms)", "tpot", "{:.0f}", True),
    ("latency p50 / p99 (s)", "latency", "{:.1f}", True),
    ("server preemptions", "preemptions", "{:.0f}", True),
    ("server waiting queue, max", "waiting_max", "{:.0f}", True),
    ("server running, max", "running_max", "{:.0f}", False),
    ("server KV use, max", "kv_usage_max", "{:.0%}", False),
)


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else spec.format(value * scale)


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None:
        return ""
    if base == 0:
        return " (-)" if value == 0 else ""
    return f" ({value / base:.2f}x)"


def markdown_table(medians: Mapping[str, Mapping[str, float | None]], repeats: int) -> str:
    """One column per target, medians over ``repeats``; ratios against ``direct`` where it ran."""
    names = list(medians)
    base = medians.get("direct")
    lines = [
        f"| median of {repeats} | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for label, key, spec, ratio in _ROWS:
        cells = []
        for name in names:
            m = medians[name]
            if key == "":
                parts = (m["ok"], m["within_slo"], m["shed"], m["errors"])
                cells.append(" / ".join(_fmt(v, "{:.0f}") for v in parts))
            elif key in ("ttft", "itl", "tpot", "latency"):
                qs = ("p50", "p99") if key in ("latency", "tpot") else ("p50", "p90", "p99")
                scale = 1000.0 if key in ("itl", "tpot") else 1.0
                vals = [m[f"{key}_{q}_s"] for q in qs]
                text = " / ".join(_fmt(v, spec, scale) for v in vals)
                if ratio and base is not None and name != "direct":
                    text += _ratio(vals[0], base[f"{key}_p50_s"])
                cells.append(text)
            else:
                text = _fmt(m[key], spec)
                if ratio and base is not None and name != "direct":
                    text += _ratio(m[key], base[key])
                cells.append(text)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    extras = sorted({k for m in medians.values() for k in m if k not in _SUMMARY_KEYS})
    for key in extras:
        cells = [_fmt(medians[name].get(key), "{:.3g}") for name in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_SUMMARY_KEYS = frozenset(Summary.__struct_fields__)


def best_limit(goodput_by_limit: Mapping[int, float]) -> int:
    """The limit with the most goodput; ties go to the smaller limit (less server pressure)."""
    return min(goodput_by_limit, key=lambda n: (-goodput_by_limit[n], n))


SWEEP_EXTRA = 3  # limits a sweep tries beyond those it was given, at most


def next_limit(goodput_by_limit: Mapping[int, float]) -> int | None:
    """The next limit a sweep should try, or None when its best is inside what it tried: a best
    at the top or bottom end may be beaten beyond it (the limiter's best sat at an end of its
    sweep in 8 of 12 scenario runs), so the sweep goes one step further that way, a step being
    the gap to the end's neighbour."""
    tried = sorted(goodput_by_limit)
    best = best_limit(goodput_by_limit)
    if len(tried) < 2:
        return None
    if best == tried[-1]:
        return best + (tried[-1] - tried[-2])
    if best == tried[0] and best > 1:
        return max(1, best - (tried[1] - tried[0]))
    return None


def kvgate_figures(
    samples: Sequence[ServerSample], states: Sequence[Mapping[str, object]]
) -> dict[str, float]:
    """Where kvgate's time goes: mean queue wait of admitted requests, its largest queue, and
    from /admin/state the most KV it reserved and the overcommit it applied."""
    out: dict[str, float] = {}
    last = samples[-1].values if samples else {}
    count = last.get("kvgate_queue_wait_seconds_count", 0.0)
    if count:
        out["kvgate_queue_wait_mean_s"] = last.get("kvgate_queue_wait_seconds_sum", 0.0) / count
    depth = gauge_max(samples, "kvgate_queue_depth")
    if depth is not None:
        out["kvgate_queue_depth_max"] = depth
    reserved: list[float] = []
    overcommit: list[float] = []
    inflight: list[float] = []
    for entry in states:
        for backend in _backends(entry.get("state")):
            for key, into in (
                ("reserved_bytes", reserved),
                ("overcommit", overcommit),
                ("inflight", inflight),
            ):
                value = backend.get(key)
                if isinstance(value, int | float):
                    into.append(float(value))
    if reserved:
        out["kvgate_reserved_gib_max"] = max(reserved) / 2**30
    if overcommit:
        out["kvgate_overcommit_max"] = max(overcommit)
    if inflight:
        out["kvgate_inflight_max"] = max(inflight)
    return out


def _backends(state: object) -> list[Mapping[str, object]]:
    """The backend entries of an /admin/state answer, wherever they sit in it."""
    found: list[Mapping[str, object]] = []
    if isinstance(state, Mapping):
        backends = state.get("backends")
        if isinstance(backends, list):
            found.extend(b for b in backends if isinstance(b, Mapping) and "url" in b)
        for value in state.values():
            if value is not backends:
                found.extend(_backends(value))
    elif isinstance(state, list):
        for value in state:
            found.extend(_backends(value))
    return found


def load_runs(out: Path, flavor: Flavor, slo: Slo) -> dict[str, list[Summary]]:
    """Summaries from the files a run left in ``out`` (``r<i>-<target>.*.json``), one list per
    target in repeat order, goodput over each repeat's shared horizon."""
    repeats: dict[int, dict[str, Summary]] = {}
    for path in sorted(out.glob("r*-*.records.json")):
        tag = path.name.removesuffix(".records.json")
        number, name = tag[1:].split("-", 1)
        records = msgspec.json.decode(path.read_bytes(), type=list[Record])
        samples_path = out / f"{tag}.samples.json"
        samples = msgspec.json.decode(samples_path.read_bytes(), type=dict[str, list[ServerSample]])
        summary = summarise(records, samples.get("server", []), flavor, slo)
        state_path = out / f"{tag}.state.json"
        states = msgspec.json.decode(state_path.read_bytes()) if state_path.exists() else []
        if "kvgate" in samples:
            summary.extra.update(kvgate_figures(samples["kvgate"], states))
        repeats.setdefault(int(number), {})[name] = summary
    runs: dict[str, list[Summary]] = {}
    for index in sorted(repeats):
        horizon = max(s.makespan_s for s in repeats[index].values())
        for name, summary in repeats[index].items():
            summary.goodput_tokens_per_s = summary.goodput_tokens / horizon
            runs.setdefault(name, []).append(summary)
    return runs


def report(out: Path, flavor: Flavor, slo: Slo, order: Sequence[str]) -> str:
    runs = load_runs(out, flavor, slo)
    names = [n for n in order if n in runs] + [n for n in runs if n not in order]
    medians = {name: median_summary(runs[name]) for name in names}
    repeats = max((len(r) for r in runs.values()), default=0)
    table = markdown_table(medians, repeats)
    (out / "summary.json").write_bytes(msgspec.json.format(msgspec.json.encode(runs)))
    (out / "table.md").write_text(table + "\n", encoding="utf-8")
    return table
