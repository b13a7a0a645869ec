"""A simulated GPU backend: an OpenAI-compatible server whose latency, memory limits,
preemption, OOM and warm-up follow a vLLM-like engine model (``SimConfig``). ``kvgate demo``
serves it, and the load tests in ``loadtest/`` measure against it.

Layers: ``allocator`` (KV blocks), ``prefix`` (the optional prefix cache on a paged pool) and
``engine`` (continuous batching, pure, simulated time) are driven in real time by ``runtime``;
``server`` speaks HTTP.
"""

from gateway.sim.config import SimConfig
from gateway.sim.engine import Engine, StepResult

__all__ = ["Engine", "SimConfig", "StepResult"]
