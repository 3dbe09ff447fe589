"""OpenTelemetry traces of each request, off unless an exporter is configured.

On when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) names a collector
(OTLP over HTTP; the SDK reads its other OTEL_* variables, e.g. OTEL_SERVICE_NAME) or when
OTEL_TRACES_EXPORTER=console (spans as JSON on stdout). Otherwise no provider is installed and
every span below is OpenTelemetry's no-op one.

A request is one trace: a server span per HTTP request (`TracingMiddleware`: method, route
template and status, never the path's values, the query, a header or the body) and, inside it, a
span per pipeline stage recorded when the stage ends (`record_stage`: decode, preprocess,
forward with `busi.queue_wait_s` and `busi.batch_size`, quality, postprocess), presentation
(`span("present")`) and results delivery (`span("results_delivery")`). Attributes are timings,
counts, task and model version: no patient data. `TraceIdFilter` puts the trace id (and span
id) into every log record written inside a span, so a log line leads to its trace.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace

log = logging.getLogger(__name__)

TRACER_NAME = "busi.service"
_OFFSET_NS = time.time_ns() - time.perf_counter_ns()  # perf_counter -> epoch nanoseconds

tracer: Any = trace.NoOpTracer()  # configure_tracing replaces it
_configured = False
# the stage names of busi_stage_duration_seconds that read otherwise in a trace
_SPAN_NAMES = {"inference": "forward"}


def exporter_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """ "otlp", "console" or None (tracing off), from the standard OTEL_* variables."""
    wanted = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if wanted == "none":
        return None
    if wanted == "console":
        return "console"
    if environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    ):
        return "otlp"
    return None


def configure_tracing(environ: Mapping[str, str] = os.environ, exporter: Any = None) -> bool:
    """Install a tracer provider when an exporter is configured (or `exporter`, a SpanExporter,
    is given: tests pass the SDK's in-memory one). True when spans are now recorded."""
    global _configured
    if _configured and exporter is None:
        return True  # one provider per process, however many apps it builds
    kind = "given" if exporter is not None else exporter_from_env(environ)
    if kind is None:
        return False

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    if exporter is not None:
        processor: Any = SimpleSpanProcessor(exporter)
    elif kind == "console":
        processor = SimpleSpanProcessor(ConsoleSpanExporter())
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processor = BatchSpanProcessor(OTLPSpanExporter())
    name = environ.get("OTEL_SERVICE_NAME") or "busi-api"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(processor)
    global tracer
    tracer = provider.get_tracer(TRACER_NAME)
    _configured = True
    log.info("tracing on: spans go to the %s exporter", kind)
    return True


def disable_tracing() -> None:
    """Back to OpenTelemetry's no-op spans (tests)."""
    global tracer, _configured
    tracer = trace.NoOpTracer()
    _configured = False


def record_stage(
    stage: str, started: float, ended: float, attributes: Mapping[str, Any] | None = None
) -> None:
    """A finished span of `stage` from perf_counter `started` to `ended`, a child of the current
    span; nothing when tracing is off or no request span is current."""
    parent = trace.get_current_span()
    if not parent.get_span_context().is_valid:
        return
    span = tracer.start_span(
        _SPAN_NAMES.get(stage, stage),
        start_time=int(started * 1e9) + _OFFSET_NS,
        attributes=dict(attributes or {}),
    )
    span.end(end_time=int(ended * 1e9) + _OFFSET_NS)


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span around a block (a child of the current one)."""
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` and `span_id` (hex) to records written inside a recorded span."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def install_trace_ids() -> None:
    """Put the trace id into the log lines: TraceIdFilter on every handler of the root logger."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, TraceIdFilter) for f in handler.filters):
            handler.addFilter(TraceIdFilter())


class TracingMiddleware:
    """A server span per HTTP request: `<METHOD> <route template>`, with the status."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        with tracer.start_as_current_span(
            method,  # renamed to "<METHOD> <route template>" once the route is known
            kind=trace.SpanKind.SERVER,
            attributes={"http.request.method": method},
        ) as current:
            status: dict[str, int] = {}

            async def send_recorded(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_recorded)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)  # "/models/{task}/card", never values
                if template:
                    current.update_name(f"{method} {template}")
                    current.set_attribute("http.route", template)
                if "code" in status:
                    current.set_attribute("http.response.status_code", status["code"])
