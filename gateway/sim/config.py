"""Configuration of the simulated GPU backend: the contract between the simulator, its CLI and
the load-test scenarios (a scenario's ``backend:`` section decodes into ``SimConfig``)."""

from __future__ import annotations

from typing import Literal

import msgspec


class SimConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    model: str = "llama-3.1-8b"
    mode: Literal["paged", "contiguous"] = "paged"
    kv_blocks: int = 2048  # KV cache size in blocks
    block_size: int = 16  # tokens per block
    # paged only: full prompt blocks already in memory are shared, not recomputed (vLLM's
    # automatic prefix caching); off by default, as in vLLM before v1
    prefix_caching: bool = False
    kv_bytes_per_token: int = 131072  # Llama-3.1-8B in bf16: 2 * 32 layers * 8 heads * 128 * 2 B
    max_num_seqs: int = 256  # most sequences decoded in one step
    prefill_tokens_per_s: float = 8000.0
    decode_step_s: float = 0.02  # time of one decode step with a batch of one
    step_per_seq_s: float = 0.0002  # extra step time per running sequence
    attend_s_per_token: float = 0.0  # extra step time per KV token a decoding sequence attends
    max_num_batched_tokens: int = 0  # tokens one step may process (chunked prefill); 0: no cap
    load_time_s: float = 0.0  # not ready this long after (re)start
    # while loading: "503" answers 503 "Loading model" (llama.cpp); "refuse" does not listen
    # until loaded, as vLLM's API server (the first load and every restart or crash reload)
    loading: Literal["503", "refuse"] = "503"
    slow_start_s: float = 0.0  # after loading, steps are slower, easing to normal over this window
    slow_start_factor: float = 3.0  # step-time multiplier at the start of slow_start_s
    oom_crash_after: int = 0  # contiguous: crash and reload after this many OOMs in 10 s (0: never)
    chars_per_token: float = 4.0  # how the simulator counts prompt tokens from text
    default_output_tokens: int = 256  # when the request asks for no length
    output_mean_ratio: float = 0.5  # output drawn lognormal around this share of max_tokens
    output_sigma: float = 0.6  # sigma of the log of that lognormal draw; 0: always the mean
    time_scale: float = 1.0  # 2.0 runs simulated time twice as fast as wall time
    seed: int = 0
