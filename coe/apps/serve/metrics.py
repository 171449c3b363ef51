"""The service's Prometheus metrics (``prometheus-client``), in a registry of its own so two
apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they only add noise to a scrape
        r = self.registry = CollectorRegistry()
        self.requests = Counter("coe_requests", "Requests answered, by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("coe_request_latency_seconds",
                                 "Time from a request's arrival to its answer", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("coe_requests_in_flight", "Requests accepted and not yet answered",
                               registry=r)
        self.queued = Gauge("coe_queue_depth", "Requests waiting for a batch", registry=r)
        self.batches = Counter("coe_batches", "Batches run", registry=r)
        self.batch_size = Histogram("coe_batch_size", "Requests per batch",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("coe_batch_seconds", "Time to answer one batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.loads = Counter("coe_model_loads", "Model loads", registry=r)
        self.distinct_weights = Counter(
            "coe_batch_distinct_weights", "Distinct model weights the batches' experts needed "
            "(a batch's loads never exceed its count)", registry=r)
        self.generations = Counter("coe_generations", "Generations made (not cached)", registry=r)
        self.cache_hits = Counter("coe_cache_hits", "Generations served from the response cache",
                                  registry=r)
        self.failures = Counter("coe_expert_failures", "Failed generations, by expert",
                                ["expert"], registry=r)
        self.resident = Gauge("coe_resident_models", "Models loaded now", registry=r)
        self.resident_bytes = Gauge(
            "coe_resident_model_bytes", "Memory each loaded model holds (its memory_bytes), by "
            "model and the node holding it (local: this machine)", ["model", "node"], registry=r)

    def show_residents(self, residents) -> None:
        """The loaded models now (``Executor.residents()``): how many, and where and how large
        each is (two loads of one label on one node add up)."""
        self.resident.set(len(residents))
        self.resident_bytes.clear()
        for r in residents:
            self.resident_bytes.labels(model=r.label, node=r.node or "local").inc(r.bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
