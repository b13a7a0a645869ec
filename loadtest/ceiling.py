"""A steady-state throughput estimate for a request mix at its mean sizes, shown beside the trace
shape (``trace.ceiling_tokens_per_s``). It is *not* an upper bound on goodput: a gateway that
sheds picks a cheaper mix, means understate what long outputs hold, and loading, slow start and
restarts are ignored. The report's yardstick is the LP bound (``loadtest.bound``) and the
clairvoyant scheduler (``loadtest.oracle``).

Derivation (steady state, warm-up over, P = mean prompt tokens, O = mean output tokens):

* Every step gives each of its B running sequences one token, so throughput is B per step.
* Step time is ``decode_step_s + step_per_seq_s * B + prefill / prefill_tokens_per_s``. By
  Little's law B/O requests finish per step, so at least B*P/O prompt tokens are prefilled per
  step (preemption only adds recomputation).
* Throughput, ``1 / (decode_step_s / B + step_per_seq_s + P / (O * prefill_tokens_per_s))``,
  grows with B, so the ceiling is at the largest B that memory and ``max_num_seqs`` allow.
* Memory. ``paged``: a sequence holds ``ceil(t / block_size)`` blocks for its t tokens, from P at
  its first step to P + O - 1 at its last, so it averages at least P + (O - 1) / 2 tokens, and B
  is at most ``kv_blocks * block_size / (P + (O - 1) / 2)``. Longer-tailed output lengths only
  raise the average (E[O^2] >= E[O]^2), so means give an upper bound. ``contiguous``: a sequence
  holds P + max_tokens tokens for its whole life, so B is at most
  ``kv_blocks * block_size / (P + M)`` with M the mean max_tokens; fragmentation only lowers it.

For the mean request each link is an upper bound; for a mix it is not (see above). What the
engine loses below it: block rounding, preemption and recomputation (paged), fragmentation and
OOMs (contiguous), and batches that are not full when the queue runs dry. Rates are per
simulated second; a server runs ``time_scale`` simulated seconds per wall-clock second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.sim.config import SimConfig
from gateway.sim.engine import validate_config


@dataclass(frozen=True, slots=True)
class Ceiling:
    tokens_per_sim_s: float  # output tokens per simulated second
    tokens_per_s: float  # per wall-clock second: tokens_per_sim_s * time_scale
    batch: float  # sequences per step at the ceiling
    step_s: float  # simulated step time at that batch, prefill share included
    limited_by: Literal["memory", "max_num_seqs"]


def ceiling(
    config: SimConfig,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    *,
    mean_max_tokens: float | None = None,
) -> Ceiling:
    """The ceiling and how it arises. ``mean_max_tokens`` (contiguous mode: what each request
    reserves for its output) defaults to ``mean_output_tokens``, the most favourable case."""
    validate_config(config)
    if mean_prompt_tokens < 1 or mean_output_tokens < 1:
        raise ValueError("a request has at least one prompt token and one output token")
    reserved = mean_output_tokens if mean_max_tokens is None else mean_max_tokens
    if reserved < mean_output_tokens:
        raise ValueError("mean_max_tokens cannot be below mean_output_tokens")
    capacity_tokens = config.kv_blocks * config.block_size
    if config.mode == "paged":
        held = mean_prompt_tokens + (mean_output_tokens - 1.0) / 2.0
    else:
        held = mean_prompt_tokens + reserved
    memory_batch = capacity_tokens / held
    limited_by: Literal["memory", "max_num_seqs"] = "memory"
    batch = memory_batch
    if memory_batch >= config.max_num_seqs:
        limited_by, batch = "max_num_seqs", float(config.max_num_seqs)
    prefill_per_step = batch * mean_prompt_tokens / mean_output_tokens
    step_s = (
        config.decode_step_s
        + config.step_per_seq_s * batch
        + prefill_per_step / config.prefill_tokens_per_s
    )
    per_sim_s = batch / step_s
    return Ceiling(per_sim_s, per_sim_s * config.time_scale, batch, step_s, limited_by)


def ceiling_tokens_per_s(
    config: SimConfig,
    mean_prompt_tokens: float,
    mean_output_tokens: float,
    *,
    mean_max_tokens: float | None = None,
) -> float:
    """Output tokens per wall-clock second that a server running ``config`` (at its
    ``time_scale``) cannot exceed for this request mix: compare measured goodput with this."""
    return ceiling(
        config, mean_prompt_tokens, mean_output_tokens, mean_max_tokens=mean_max_tokens
    ).tokens_per_s
