"""Prometheus metrics of one server (its own registry, so several servers can share a process).

``GET /metrics`` serves :meth:`ServeMetrics.render`. Names (all prefixed ``lorakit_``): ``requests_total``
by outcome (stop, length, cancelled, error), ``prompt_tokens_total``, ``generated_tokens_total``,
``batch_rows`` (running rows after the last iteration), ``queue_length``, ``adapters_resident``,
``adapter_events_total`` (load / evict / unload), histograms ``time_to_first_token_seconds``,
``inter_token_seconds``, ``request_seconds``, ``adapter_load_seconds``, ``batch_occupancy`` (rows
per decode iteration).
"""

from __future__ import annotations

from typing import Any

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServeMetrics:
    """The engine's metrics sink backed by ``prometheus_client`` (lazily imported: the ``serve`` extra)."""

    def __init__(self, max_batch: int = 64) -> None:
        import prometheus_client as pc

        self.pc = pc
        self.registry = pc.CollectorRegistry()
        r = self.registry
        self.requests = pc.Counter("lorakit_requests", "finished requests by outcome", ["outcome"], registry=r)
        self.prompt_tokens = pc.Counter("lorakit_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated = pc.Counter("lorakit_generated_tokens", "generated tokens", registry=r)
        self.rows = pc.Gauge("lorakit_batch_rows", "rows in the running batch", registry=r)
        self.queue = pc.Gauge("lorakit_queue_length", "requests waiting to be admitted", registry=r)
        self.resident = pc.Gauge("lorakit_adapters_resident", "adapters loaded on the model", registry=r)
        self.adapter_events = pc.Counter("lorakit_adapter_events", "adapter loads, evictions, unloads", ["event"],
                                         registry=r)
        self.ttft_h = pc.Histogram("lorakit_time_to_first_token_seconds", "submission to first token",
                                   buckets=_LATENCY, registry=r)
        self.itl_h = pc.Histogram("lorakit_inter_token_seconds", "time between two tokens of a request",
                                  buckets=_LATENCY, registry=r)
        self.e2e_h = pc.Histogram("lorakit_request_seconds", "submission to last event", buckets=_LATENCY, registry=r)
        self.load_h = pc.Histogram("lorakit_adapter_load_seconds", "adapter load time", buckets=_LATENCY, registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, max_batch})
        self.occupancy = pc.Histogram("lorakit_batch_occupancy", "rows per engine iteration", buckets=buckets,
                                      registry=r)

    def request_done(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generated.inc(completion_tokens)
        self.e2e_h.observe(seconds)

    def ttft(self, seconds: float) -> None:
        self.ttft_h.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl_h.observe(seconds)

    def step(self, rows: int, waiting: int, resident: int) -> None:
        self.rows.set(rows)
        self.queue.set(waiting)
        self.resident.set(resident)
        if rows:
            self.occupancy.observe(rows)

    def adapter(self, event: str, seconds: float) -> None:
        self.adapter_events.labels(event).inc()
        if event == "load":
            self.load_h.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return self.pc.generate_latest(self.registry), self.pc.CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, str] | None = None) -> Any:
        """One sample's current value (tests and the benchmark read it)."""
        return self.registry.get_sample_value(name, labels or {})
