"""An upper bound on the goodput any gateway can get from a simulated GPU on one trace: the
optimum of a time-indexed linear program built from the simulator's own cost model
(``gateway.sim.engine``). No schedule, clairvoyant or not, meets more SLOs than it allows.

Formulation. The horizon H (scenario duration + drain, wall seconds) is cut into K intervals
of equal length. Per request r (arrival a_r, prompt P_r, true output O_r, deadline
d_r = a_r + latency SLO, prefill deadline a_r + TTFT SLO when streamed, else d_r):

* x_r in [0, 1]: the share of r served within its SLO (1 for each such request in a real run);
* y_rk >= 0: its output tokens made in interval k, only in intervals that meet [a_r, d_r];
  sum_k y_rk = O_r x_r;
* p_rk >= 0: its prompt tokens prefilled in interval k, only before its prefill deadline;
  sum_k p_rk = P_r x_r;
* s_k >= 0: the (fractional) number of steps in interval k.

Per interval k, with T_k the compute time the engine has in it (simulated seconds: zero while
loading or restarting, length / slow-start multiplier while warming, else its length x
time_scale):

* time: decode_step_s s_k + step_per_seq_s sum_r y_rk + sum_r p_rk / prefill_tokens_per_s <= T_k
* one token per sequence per step: y_rk <= s_k; at most max_num_seqs: sum_r y_rk <= N s_k
* memory, each token's step holds at least the request's prompt blocks (paged) or its whole
  region of prompt + output (contiguous): sum_r b_r y_rk <= kv_blocks s_k
* chunked prefill: sum_r p_rk <= max_num_batched_tokens s_k

Over the run, with each request's exact footprint (paged: the step making token j holds
ceil((P_r + j - 1) / block_size) blocks; attention reads P_r + j - 1 tokens for j >= 2):

* memory-time: sum_r M_r x_r <= kv_blocks sum_k s_k
* compute: sum_k (interval time terms) + attend_s_per_token sum_r A_r x_r <= sum_k T_k

Objective: maximise sum_r O_r x_r; the bound is that over H. Every constraint holds for any
real schedule (a step straddling two intervals is split between them in proportion; its
tokens too), so the optimum is an upper bound. It ignores what makes real schedules worse:
ordering within a request, preemption, fragmentation, requests lost to a restart.

Prefix caching (``prefix_caching``, paged): C_r is the number of r's leading full prompt blocks
that some other request of the trace has too (the same block hashes the simulator derives from
the same text, at most (P_r - 1) // block_size, as the engine always computes a prompt's last
token). Only those can ever be served to r from the cache: any later block of r is r's alone
(the cache may give it back to r after a preemption, which saves only a recomputation the LP
never charges).
The LP counts them as free: r prefills P_r - C_r block_size tokens, and each of its steps holds
C_r blocks fewer (in b_r and M_r). A real schedule computes each shared block at least once and
holds it while any sharer runs, so dropping them entirely only relaxes the constraints: the
optimum stays an upper bound (a looser one the more is shared). Without caching C_r = 0.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse  # type: ignore[import-untyped]
from scipy.optimize import linprog  # type: ignore[import-untyped]

from gateway.sim.config import SimConfig
from loadtest.generator import PlannedRequest, block_hashes
from loadtest.scenario import Scenario

INTERVALS = 30  # 60 gives the same optimum on the shipped scenarios, six times slower
SLICES = 20  # per interval, to integrate the slow-start multiplier
# the harness starts the trace a little after the backend's clock and POSTs a restart a little
# after its cue: the bound assumes the backend was ready this much earlier, and went down later
START_SLACK_S = 0.5


@dataclass(frozen=True, slots=True)
class Bound:
    tokens: float  # SLO-met output tokens at most
    tokens_per_s: float  # over the horizon
    horizon_s: float
    intervals: int
    status: str


def _multiplier(cfg: SimConfig, since_ready_sim_s: float) -> float:
    if cfg.slow_start_s <= 0 or since_ready_sim_s >= cfg.slow_start_s:
        return 1.0
    progress = max(0.0, since_ready_sim_s / cfg.slow_start_s)
    return cfg.slow_start_factor + (1.0 - cfg.slow_start_factor) * progress


def compute_budgets(scenario: Scenario, edges: np.ndarray) -> np.ndarray:
    """Simulated compute seconds per interval, never less than the engine really has."""
    cfg = scenario.backend
    ts = cfg.time_scale
    load_wall = cfg.load_time_s / ts
    ready = load_wall - START_SLACK_S if scenario.backend_wait == "listening" else -math.inf
    downs: list[tuple[float, float]] = []
    readies = [ready]
    if scenario.restart_at_s is not None:
        down_from = scenario.restart_at_s + START_SLACK_S
        downs.append((down_from, scenario.restart_at_s + load_wall))
        readies.append(scenario.restart_at_s + load_wall)
    out = np.zeros(len(edges) - 1)
    for k in range(len(edges) - 1):
        width = (edges[k + 1] - edges[k]) / SLICES
        total = 0.0
        for i in range(SLICES):
            lo, hi = edges[k] + i * width, edges[k] + (i + 1) * width
            if hi <= ready or any(lo >= a and hi <= b for a, b in downs):
                continue
            # the multiplier falls with time: its value at the slice's end bounds the slice
            since = min(hi - r for r in readies if r <= hi) if any(r <= hi for r in readies) else 0
            share = (hi - max(lo, ready)) / (hi - lo) if lo < ready else 1.0
            total += width * share * ts / _multiplier(cfg, since * ts)
        out[k] = total
    return out


def shareable_blocks(scenario: Scenario, planned: Sequence[PlannedRequest]) -> dict[int, int]:
    """Per request id, C_r: its leading full prompt blocks that another request of the trace
    has too, the most the prefix cache can serve it (none without prefix caching)."""
    bs = scenario.backend.block_size
    chains: dict[int, tuple[int, ...]] = {}
    for req in planned:
        hashes = block_hashes(scenario, req)
        if hashes is not None:
            chains[req.id] = hashes[: req.prompt_tokens // bs]
    seen = Counter(h for chain in chains.values() for h in chain)
    shareable: dict[int, int] = {}
    for req in planned:
        chain = chains.get(req.id, ())[: (req.prompt_tokens - 1) // bs]
        shareable[req.id] = next((i for i, h in enumerate(chain) if seen[h] < 2), len(chain))
    return shareable


def _footprint(
    cfg: SimConfig, prompt: int, output: int, cached: int = 0
) -> tuple[int, float, float]:
    """(blocks a token's step holds at least, blocks x steps over its life, tokens attended);
    paged, ``cached`` of its prompt blocks are counted as someone else's."""
    bs = cfg.block_size
    if cfg.mode == "contiguous":
        region = -(-(prompt + output) // bs)
        per_token, memory = region, float(region * output)
    else:
        per_token = -(-prompt // bs) - cached
        memory = float(sum(-(-(prompt + j - 1) // bs) - cached for j in range(1, output + 1)))
    attended = (output - 1) * prompt + output * (output - 1) / 2.0
    return per_token, memory, attended


def upper_bound(
    scenario: Scenario, planned: Sequence[PlannedRequest], intervals: int = INTERVALS
) -> Bound:
    cfg = scenario.backend
    horizon = scenario.duration_s + scenario.drain_timeout_s
    edges = np.linspace(0.0, horizon, intervals + 1)
    width = horizon / intervals
    budgets = compute_budgets(scenario, edges)
    slos = {name: t.slo for name, t in scenario.tenants.items()}
    shareable = shareable_blocks(scenario, planned)

    # columns: s_k, then per request x_r, its y_rk, its p_rk
    cols = intervals
    obj: list[float] = [0.0] * intervals
    rows_ub: list[tuple[int, int, float]] = []  # (row, col, value)
    rhs_ub: list[float] = []
    eq: list[tuple[int, int, float]] = []
    n_eq = 0
    # interval rows: time, max seqs, memory, chunk budget
    time_row = [len(rhs_ub) + k for k in range(intervals)]
    rhs_ub += list(budgets)
    seq_row = [len(rhs_ub) + k for k in range(intervals)]
    rhs_ub += [0.0] * intervals
    mem_row = [len(rhs_ub) + k for k in range(intervals)]
    rhs_ub += [0.0] * intervals
    chunk_row = [len(rhs_ub) + k for k in range(intervals)] if cfg.max_num_batched_tokens else []
    rhs_ub += [0.0] * len(chunk_row)
    mem_total, compute_total = len(rhs_ub), len(rhs_ub) + 1
    rhs_ub += [0.0, float(budgets.sum())]
    for k in range(intervals):
        rows_ub.append((time_row[k], k, cfg.decode_step_s))
        rows_ub.append((seq_row[k], k, -float(cfg.max_num_seqs)))
        rows_ub.append((mem_row[k], k, -float(cfg.kv_blocks)))
        rows_ub.append((mem_total, k, -float(cfg.kv_blocks)))
        rows_ub.append((compute_total, k, cfg.decode_step_s))
        if chunk_row:
            rows_ub.append((chunk_row[k], k, -float(cfg.max_num_batched_tokens)))

    def window(lo: float, hi: float) -> range:
        first = max(0, int(lo // width))
        last = min(intervals, math.ceil(min(hi, horizon) / width))
        return range(first, max(first, last))

    for req in planned:
        slo = slos[req.tenant]
        out_window = window(req.at_s, req.at_s + slo.latency_s)
        prefill_end = req.at_s + (slo.ttft_s if req.stream else slo.latency_s)
        pre_window = window(req.at_s, min(prefill_end, req.at_s + slo.latency_s))
        if not out_window or not pre_window:
            continue
        cached = shareable[req.id]
        per_token, memory, attended = _footprint(cfg, req.prompt_tokens, req.output_tokens, cached)
        x = cols
        cols += 1
        obj.append(float(req.output_tokens))
        rows_ub.append((mem_total, x, memory))
        rows_ub.append((compute_total, x, cfg.attend_s_per_token * attended))
        eq.append((n_eq, x, -float(req.output_tokens)))
        eq.append((n_eq + 1, x, -float(req.prompt_tokens - cached * cfg.block_size)))
        for k in out_window:
            y = cols
            cols += 1
            obj.append(0.0)
            eq.append((n_eq, y, 1.0))
            rows_ub.append((len(rhs_ub), y, 1.0))  # y_rk <= s_k
            rows_ub.append((len(rhs_ub), k, -1.0))
            rhs_ub.append(0.0)
            rows_ub.append((time_row[k], y, cfg.step_per_seq_s))
            rows_ub.append((compute_total, y, cfg.step_per_seq_s))
            rows_ub.append((seq_row[k], y, 1.0))
            rows_ub.append((mem_row[k], y, float(per_token)))
        for k in pre_window:
            p = cols
            cols += 1
            obj.append(0.0)
            eq.append((n_eq + 1, p, 1.0))
            rows_ub.append((time_row[k], p, 1.0 / cfg.prefill_tokens_per_s))
            rows_ub.append((compute_total, p, 1.0 / cfg.prefill_tokens_per_s))
            if chunk_row:
                rows_ub.append((chunk_row[k], p, 1.0))
        n_eq += 2

    if cols == intervals:
        return Bound(0.0, 0.0, horizon, intervals, "no request can meet its SLO")
    r, c, v = zip(*rows_ub, strict=True)
    a_ub = sparse.csr_array((v, (r, c)), shape=(len(rhs_ub), cols))
    er, ec, ev = zip(*eq, strict=True)
    a_eq = sparse.csr_array((ev, (er, ec)), shape=(n_eq, cols))
    bounds: list[tuple[float, float | None]] = [(0.0, None)] * cols
    for i, value in enumerate(obj):
        if value > 0:
            bounds[i] = (0.0, 1.0)  # x_r
    result = linprog(
        -np.asarray(obj),
        A_ub=a_ub,
        b_ub=np.asarray(rhs_ub),
        A_eq=a_eq,
        b_eq=np.zeros(n_eq),
        bounds=bounds,
        method="highs",
    )
    if result.status != 0:
        raise RuntimeError(f"the bound's LP did not solve: {result.message}")
    tokens = -float(result.fun)
    return Bound(tokens, tokens / horizon, horizon, intervals, str(result.message))
