"""What parsing one backend's /metrics page costs the event loop: the whole page through the
Prometheus parser (what a scrape did) against the filtered page (``needed_lines``, what it does).

The page imitates a vLLM server's: process and Python series, the request histograms with their
buckets, counters, and the few gauges admission reads; about 570 lines.

python -m loadtest.bench_scrape [--rounds 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

from gateway.backends.flavors import metric_map
from gateway.backends.parse import parse_metrics, samples
from gateway.core.backend import Signals

_MODEL = 'model_name="meta-llama/Llama-3.1-8B-Instruct"'
_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def vllm_like_page() -> str:
    lines: list[str] = []

    def family(name: str, kind: str, rows: list[str]) -> None:
        lines.extend((f"# HELP {name} {name.replace('_', ' ')}.", f"# TYPE {name} {kind}", *rows))

    for gen in range(3):
        for what in ("objects_collected", "objects_uncollectable", "collections"):
            family(
                f"python_gc_{what}",
                "counter",
                [f'python_gc_{what}_total{{generation="{gen}"}} 1.0'],
            )
    for name in ("virtual_memory_bytes", "resident_memory_bytes", "start_time_seconds",
                 "cpu_seconds_total", "open_fds", "max_fds"):  # fmt: skip
        family(f"process_{name}", "gauge", [f"process_{name} 12345.0"])
    family("vllm:num_requests_running", "gauge", [f"vllm:num_requests_running{{{_MODEL}}} 12.0"])
    family("vllm:num_requests_waiting", "gauge", [f"vllm:num_requests_waiting{{{_MODEL}}} 3.0"])
    family("vllm:kv_cache_usage_perc", "gauge", [f"vllm:kv_cache_usage_perc{{{_MODEL}}} 0.42"])
    family(
        "vllm:cache_config_info",
        "gauge",
        [f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="27000",{_MODEL}}} 1.0'],
    )
    family("vllm:num_preemptions", "counter", [f"vllm:num_preemptions_total{{{_MODEL}}} 7.0"])
    for name in ("prompt_tokens", "generation_tokens", "request_success"):
        family(f"vllm:{name}", "counter", [f"vllm:{name}_total{{{_MODEL}}} 123456.0"])

    def histogram(name: str, bounds: tuple[float, ...]) -> None:
        rows = [f'{name}_bucket{{le="{b}",{_MODEL}}} {i * 10.0}' for i, b in enumerate(bounds)]
        rows += [
            f'{name}_bucket{{le="+Inf",{_MODEL}}} 1000.0',
            f"{name}_count{{{_MODEL}}} 1000.0",
            f"{name}_sum{{{_MODEL}}} 4321.0",
        ]
        family(name, "histogram", rows)

    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "request_queue_time_seconds",
                 "request_inference_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "inter_token_latency_seconds"):  # fmt: skip
        histogram(f"vllm:{name}", _LATENCY)
    for name in ("request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total",
                 "request_max_num_generation_tokens", "request_params_n",
                 "request_params_max_tokens", "request_prefill_kv_computed_tokens",
                 "request_cached_tokens", "request_decode_tokens"):  # fmt: skip
        histogram(f"vllm:{name}", _TOKENS)
    while len(lines) < 570:
        n = len(lines)
        family(f"vllm:extra_{n}", "gauge", [f"vllm:extra_{n}{{{_MODEL}}} 1.0"])
    return "\n".join(lines) + "\n"


def _median_ms(work: object, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        work()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    page = vllm_like_page()
    names = metric_map(Signals.VLLM)
    whole = _median_ms(lambda: samples(page), args.rounds)
    filtered = _median_ms(lambda: parse_metrics(page, names, at=0.0), args.rounds)
    lines = page.count("\n")
    print(f"page: {lines} lines, {len(page)} bytes")
    print(f"whole page through the parser: {whole:.3f} ms (median of {args.rounds})")
    print(f"parse_metrics with the filter: {filtered:.3f} ms")

    def core_pct(ms: float) -> float:  # 50 scrapes a second
        return ms * 50 / 1000 * 100

    print(
        f"50 backends scraped every 1 s: {core_pct(filtered):.2f}% of a core "
        f"(the whole page: {core_pct(whole):.1f}%)"
    )


if __name__ == "__main__":
    main()
