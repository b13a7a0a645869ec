"""kvgate: an adaptive rate-limiting gateway for LLM backends."""

__version__ = "0.1.0"
