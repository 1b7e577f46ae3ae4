"""The server's Prometheus metrics (GET /metrics).

Design: one `CollectorRegistry` per app (not the process-global one), so several apps in one
process (tests) never share or collide. The engine's state (queue depth, running rows, tokens per
second, token counters) is read at scrape time by `EngineCollector`, so the engine thread does no
bookkeeping for it; request latency, time to first token (streams), accepted requests by route
and refused requests by reason are recorded by the server as they happen.

Trade-off: the engine's counters are plain ints read without a lock from another thread: a
scrape may see a value one step old, never a torn one.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine

# A refused request's HTTP status -> its `reason` label; every other 4xx is "invalid".
REJECTED = {401: "unauthorized", 413: "too_large", 429: "queue_full", 500: "engine_error", 503: "shutdown",
            504: "timeout"}


class EngineCollector:
    """Prometheus collector that reads the engine's state at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        e = self.engine
        yield GaugeMetricFamily("lmforge_queue_depth", "Requests waiting for a slot", value=e.queue_depth)
        yield GaugeMetricFamily("lmforge_active_slots", "Requests in the running batch", value=e.active_slots)
        yield GaugeMetricFamily("lmforge_max_batch", "Slots in the running batch", value=e.max_batch)
        yield GaugeMetricFamily("lmforge_tokens_per_second", "Generated tokens per second over the last 10 s",
                                value=e.tokens_per_second())
        yield CounterMetricFamily("lmforge_prompt_tokens", "Prompt tokens prefilled", value=e.prompt_tokens)
        yield CounterMetricFamily("lmforge_generation_tokens", "Tokens generated", value=e.generated_tokens)


class Metrics:
    """An app's registry and the metrics the server records itself."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(EngineCollector(engine))
        self.latency = Histogram("lmforge_request_latency_seconds", "Time from request to last token", ["route"],
                                 registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.first_token = Histogram("lmforge_time_to_first_token_seconds", "Time from request to first token (streams)",
                                     ["route"], registry=registry,
                                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.rejected = Counter("lmforge_rejected_requests", "Requests refused, by reason", ["reason"], registry=registry)
        self.requests = Counter("lmforge_requests", "Requests accepted, by route", ["route"], registry=registry)

    def reject(self, status: int) -> None:
        """Count a refused request by its HTTP status (also one refused after a stream's 200)."""
        self.rejected.labels(REJECTED.get(status, "invalid")).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics", "EngineCollector", "REJECTED"]
