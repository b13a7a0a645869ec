"""OpenTelemetry traces, optional (the ``otel`` extra) and off unless ``server.tracing.enabled``:
one span per request with the GenAI semantic conventions' attributes (``gen_ai.operation.name``,
``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``, the time to the first
token) plus the HTTP status and kvgate's tenant and outcome. A ``traceparent`` from the client
makes the span its child; the backend gets the gateway span's as its parent.

Spans go over OTLP/HTTP to what the standard ``OTEL_EXPORTER_OTLP_*`` variables name (default
http://localhost:4318). Off, the request path pays one ``None`` check.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from gateway.errors import PolicyError

# The operation names of the GenAI conventions, by the path's API (others: the path itself).
_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
}


class RequestTracer:
    """Starts and ends request spans on an OpenTelemetry ``TracerProvider``."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import propagate, trace

        self._tracer = provider.get_tracer("kvgate")
        self._propagate = propagate
        self._trace = trace
        self._provider = provider

    def start(self, path: str, incoming: Mapping[str, str]) -> Any:
        """A span for a request on ``path``, the child of the client's ``traceparent``."""
        operation = _OPERATIONS.get(path, path)
        span = self._tracer.start_span(
            operation,
            context=self._propagate.extract(incoming),
            kind=self._trace.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation, "url.path": path},
        )
        return span

    def inject(self, span: Any, headers: MutableMapping[str, str]) -> None:
        """``traceparent`` (and friends) of ``span`` into the upstream request's headers."""
        self._propagate.inject(headers, context=self._trace.set_span_in_context(span))

    def end(
        self,
        span: Any,
        *,
        model: str | None,
        tenant: str | None,
        status: int,
        outcome: str,
        input_tokens: int | None,
        output_tokens: int | None,
        ttft_s: float | None,
        end_ns: int | None = None,
    ) -> None:
        operation = span.attributes.get("gen_ai.operation.name", "") if span.attributes else ""
        if model is not None:
            span.update_name(f"{operation} {model}")
            span.set_attribute("gen_ai.request.model", model)
        if tenant is not None:
            span.set_attribute("kvgate.tenant", tenant)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("kvgate.outcome", outcome)
        if input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
        if output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
        if ttft_s is not None:
            # the conventions name this a metric (gen_ai.server.time_to_first_token); on the
            # span it is the same number, in seconds
            span.set_attribute("gen_ai.server.time_to_first_token", ttft_s)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, outcome))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        self._provider.shutdown()


def otlp_tracer(service_name: str, source: str) -> RequestTracer:
    """A tracer exporting over OTLP/HTTP in batches; the ``otel`` extra missing is a policy
    error (the policy asked for traces)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise PolicyError(
            source,
            "at $.server.tracing.enabled: OpenTelemetry is not installed "
            "(pip install 'kvgate[otel]')",
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return RequestTracer(provider)
