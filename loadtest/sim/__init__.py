"""A simulated GPU backend for load tests: an OpenAI-compatible server whose latency, memory
limits, preemption, OOM and warm-up follow a vLLM-like engine model (``SimConfig``).

Layers: ``allocator`` (KV blocks) and ``engine`` (continuous batching, pure, simulated time) are
driven in real time by ``runtime``; ``server`` speaks HTTP; ``ceiling`` bounds the throughput.
"""

from loadtest.sim.ceiling import Ceiling, ceiling, ceiling_tokens_per_s
from loadtest.sim.config import SimConfig
from loadtest.sim.engine import Engine, StepResult

__all__ = ["Ceiling", "Engine", "SimConfig", "StepResult", "ceiling", "ceiling_tokens_per_s"]
