"""Prometheus metrics of one engine, in its own registry (no globals): the gateway adds
its request metrics to the same registry and renders it at /metrics."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
WEBHOOK_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.batch_size = Histogram("alluse_batch_size", "Operations per committed batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.commit_latency = Histogram("alluse_commit_latency_seconds", "Time to commit one batch",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.operations = Counter("alluse_operations_total", "Engine operations by kind and outcome",
                                  ["operation", "outcome"], registry=r)
        self.resident_actors = Gauge("alluse_resident_actors", "Account actors resident in memory", registry=r)
        self.mailbox_depth_max = Gauge("alluse_mailbox_depth_max", "Deepest account mailbox", registry=r)
        self.operations_in_flight = Gauge("alluse_operations_in_flight", "Operations admitted and not finished",
                                          registry=r)
        self.write_queue_depth = Gauge("alluse_write_queue_depth", "Operations waiting for the writer",
                                       registry=r)
        self.activations = Counter("alluse_activations_total", "Account actors activated", registry=r)
        self.passivations = Counter("alluse_passivations_total", "Account actors passivated", registry=r)
        self.actor_failures = Counter("alluse_actor_failures_total", "Account actors that failed unexpectedly",
                                      registry=r)

        self.restarts = Counter("alluse_actor_restarts_total", "Account actors restarted by their supervisor",
                                registry=r)
        self.restart_latency = Histogram("alluse_actor_restart_seconds", "From an actor's failure to its successor "
                                         "being resident", buckets=LATENCY_BUCKETS_S, registry=r)
        self.quarantines = Counter("alluse_quarantines_total", "Accounts quarantined after too many restarts",
                                   registry=r)
        self.drawdown_breaches = Gauge("alluse_drawdown_breaches", "Accounts whose drawdown has reached their "
                                       "type's limit", registry=r)
        self.forks = Counter("alluse_forks_total", "Units forked", registry=r)
        self.merges = Counter("alluse_merges_total", "Units merged", registry=r)
        # Webhooks (actors.webhooks); per-endpoint series are removed with their endpoint.
        self.webhook_deliveries = Counter("alluse_webhook_deliveries_total", "Webhook delivery attempts by outcome",
                                          ["outcome"], registry=r)
        self.webhook_delivery_latency = Histogram("alluse_webhook_delivery_seconds", "One webhook attempt, from "
                                                  "connecting to the end of the answer",
                                                  buckets=WEBHOOK_BUCKETS_S, registry=r)
        # Per endpoint, and at 0 from the moment the endpoint is known, so that the
        # first dead letter is an increase Prometheus can see.
        self.webhook_dead_letters = Counter("alluse_webhook_dead_letters_total", "Events that exhausted their "
                                            "retry schedule", ["endpoint"], registry=r)
        self.webhook_lag_events = Gauge("alluse_webhook_lag_events", "Outbox events after the endpoint's cursor",
                                        ["endpoint"], registry=r)
        self.webhook_lag_seconds = Gauge("alluse_webhook_lag_seconds", "Age of the oldest event the endpoint has "
                                         "not yet received", ["endpoint"], registry=r)
        self.webhook_circuit_state = Gauge("alluse_webhook_circuit_state", "Circuit breaker: 0 closed, "
                                           "1 half-open, 2 open", ["endpoint"], registry=r)

    def observe_batch(self, size: int, elapsed_s: float) -> None:
        self.batch_size.observe(size)
        self.commit_latency.observe(elapsed_s)
