"""PNG figures of a comparison, drawn from the records and backend samples (matplotlib's Agg
canvas through ``Figure``, no pyplot state):
throughput over time, in-flight requests and backend queue over time, refusals over time,
latency CDFs. Panels that compare targets share their axes, so a taller line is a larger number.

The series functions are pure (records in, lists out) so the figures show what the report counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from loadtest.records import BackendSample, RequestRecord, Result

BIN_S = 1.0


def throughput_series(
    records: Sequence[RequestRecord], end_s: float, bin_s: float = BIN_S
) -> tuple[list[float], list[float], list[float]]:
    """(bin starts, output tokens/s of successful requests, of those within SLO). A streamed
    request's tokens are spread evenly from its first token to its end; a non-streamed one's all
    count at its end (the client cannot see when its generation started)."""
    bins = max(1, math.ceil(end_s / bin_s))
    all_ok = [0.0] * bins
    good = [0.0] * bins
    for r in records:
        if r.result is not Result.OK or r.done_s is None:
            continue
        start = r.first_token_s if r.first_token_s is not None else r.done_s
        tokens = float(r.output_tokens or 0)
        for i, share in _overlaps(start, r.done_s, bin_s, bins):
            all_ok[i] += tokens * share / bin_s
            if r.within_slo():
                good[i] += tokens * share / bin_s
    return [i * bin_s for i in range(bins)], all_ok, good


def _overlaps(start: float, end: float, bin_s: float, bins: int) -> list[tuple[int, float]]:
    """(bin, share of [start, end] inside it); an empty interval lies wholly in its bin."""
    last = bins - 1
    if end <= start:
        return [(min(last, int(end // bin_s)), 1.0)]
    first_bin, last_bin = int(start // bin_s), min(last, int(end // bin_s))
    out = []
    for i in range(min(first_bin, last), last_bin + 1):
        lo, hi = max(start, i * bin_s), min(end, (i + 1) * bin_s)
        if i == last:
            hi = end  # whatever runs past the last bin is shown in it
        if hi > lo:
            out.append((i, (hi - lo) / (end - start)))
    return out


def refusals_series(
    records: Sequence[RequestRecord], end_s: float, bin_s: float = BIN_S
) -> tuple[list[float], list[float], list[float]]:
    """(bin starts, 429s per second, 503s per second), by when the client got its final answer
    (a request retried until it passed is not a refusal)."""
    bins = max(1, math.ceil(end_s / bin_s))
    limited = [0.0] * bins
    shed = [0.0] * bins
    for r in records:
        if r.result not in (Result.RATE_LIMITED, Result.SHED):
            continue
        at = r.done_s if r.done_s is not None else r.sent_s
        if at is None:
            continue
        i = min(bins - 1, max(0, int(at // bin_s)))
        (limited if r.result is Result.RATE_LIMITED else shed)[i] += 1.0 / bin_s
    return [i * bin_s for i in range(bins)], limited, shed


def inflight_series(
    records: Sequence[RequestRecord], end_s: float, step_s: float = 0.25
) -> tuple[list[float], list[int]]:
    """Requests the client had sent and not yet seen end, sampled every step_s (a request cut at
    the end counts until end_s). Includes what a gateway holds in its queue."""
    times = [i * step_s for i in range(max(1, math.ceil(end_s / step_s)) + 1)]
    counts = [0] * len(times)
    for r in records:
        if r.sent_s is None:
            continue
        stop = end_s if r.done_s is None else r.done_s
        first = math.ceil(r.sent_s / step_s)
        for i in range(first, len(times)):
            if times[i] >= stop:
                break
            counts[i] += 1
    return times, counts


def backend_series(samples: Sequence[BackendSample], key: str) -> tuple[list[float], list[float]]:
    points = [(s.t_s, v) for s in samples if isinstance(v := s.stats.get(key), int | float)]
    return [t for t, _ in points], [float(v) for _, v in points]


def backend_rate(
    samples: Sequence[BackendSample], key: str, every: int = 2
) -> tuple[list[float], list[float]]:
    """Rate of change per wall second of a backend counter, between samples ``every`` apart,
    placed at the end of each interval."""
    times, values = backend_series(samples, key)
    pairs = zip(range(0, len(times) - every, every), range(every, len(times), every), strict=True)
    points = [(times[j], (values[j] - values[i]) / (times[j] - times[i])) for i, j in pairs]
    return [t for t, _ in points], [max(0.0, r) for _, r in points]


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    return ordered, [(i + 1) / len(ordered) for i in range(len(ordered))]


def draw_all(
    records: Mapping[str, Sequence[RequestRecord]],
    samples: Mapping[str, Sequence[BackendSample]],
    ceiling: float,
    end_s: float,
    out: Path,
) -> list[str]:
    """Write the figures into ``out``; returns their file names (relative to ``out``)."""
    if not records:
        return []
    names = ["throughput.png", "inflight.png", "refusals.png", "latency_cdf.png"]
    _throughput(records, samples, ceiling, end_s, out / names[0])
    _inflight(records, samples, end_s, out / names[1])
    _refusals(records, end_s, out / names[2])
    _latency_cdf(records, out / names[3])
    return names


def _panels(n: int, title: str) -> tuple[Figure, list[Any]]:
    """One panel a target, one above the other, on shared axes; room on the right for the
    legends, which would cover the data inside."""
    fig = Figure(figsize=(11, 0.6 + 2.6 * n))
    axes = fig.subplots(n, 1, squeeze=False, sharex=True, sharey=True)
    fig.suptitle(title)
    return fig, list(axes[:, 0])


def _legend(ax: Any) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")


def _throughput(
    records: Mapping[str, Sequence[RequestRecord]],
    samples: Mapping[str, Sequence[BackendSample]],
    ceiling: float,
    end_s: float,
    path: Path,
) -> None:
    fig, axes = _panels(len(records), "Output tokens per second, by target")
    for ax, (target, recs) in zip(axes, records.items(), strict=True):
        times, all_ok, good = throughput_series(recs, end_s)
        ax.step(times, all_ok, where="post", label="output tok/s (ok)")
        ax.step(times, good, where="post", label="goodput tok/s (within SLO)")
        ax.plot(*backend_rate(samples.get(target, ()), "generated_tokens"), label="backend tok/s")
        ax.axhline(ceiling, color="grey", linestyle="--", label="ceiling")
        ax.set_title(target)
        ax.set_ylabel("tokens/s")
        _legend(ax)
    axes[-1].set_xlabel("seconds since start (1 s bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _inflight(
    records: Mapping[str, Sequence[RequestRecord]],
    samples: Mapping[str, Sequence[BackendSample]],
    end_s: float,
    path: Path,
) -> None:
    fig, axes = _panels(len(records), "Requests in flight (client) and in the backend, by target")
    for ax, (target, recs) in zip(axes, records.items(), strict=True):
        times, counts = inflight_series(recs, end_s)
        ax.plot(times, counts, label="client in flight")
        for key in ("running", "waiting"):
            t, v = backend_series(samples.get(target, ()), key)
            ax.plot(t, v, label=f"backend {key}")
        ax.set_title(target)
        ax.set_ylabel("requests")
        _legend(ax)
    axes[-1].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _refusals(records: Mapping[str, Sequence[RequestRecord]], end_s: float, path: Path) -> None:
    fig, axes = _panels(len(records), "Refusals per second (final answers), by target")
    for ax, (target, recs) in zip(axes, records.items(), strict=True):
        times, limited, shed = refusals_series(recs, end_s)
        ax.step(times, limited, where="post", label="429 rate limited")
        ax.step(times, shed, where="post", label="503 shed")
        ax.set_title(target)
        ax.set_ylabel("per second")
        _legend(ax)
    axes[-1].set_xlabel("seconds since start (1 s bins)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _latency_cdf(records: Mapping[str, Sequence[RequestRecord]], path: Path) -> None:
    fig = Figure(figsize=(10, 4.0))
    ttft_ax, latency_ax = fig.subplots(1, 2)
    fig.suptitle("Latency of successful requests: share at or below each time")
    for target, recs in records.items():
        ok = [r for r in recs if r.result is Result.OK]
        ttft_ax.step(*cdf([r.ttft_s for r in ok if r.ttft_s is not None]), label=target)
        latency_ax.step(*cdf([r.latency_s for r in ok if r.latency_s is not None]), label=target)
    for ax, what in ((ttft_ax, "TTFT (streamed, ok)"), (latency_ax, "end-to-end latency (ok)")):
        ax.set_xlabel(f"{what}, seconds from scheduled time")
        ax.set_ylabel("share of requests")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
