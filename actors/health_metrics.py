"""Gauges read at scrape time from the engine's state, for the alert rules
(config/prometheus/alerts.yml): the database's health as the writer sees it, quarantined
accounts, the bounds the queues are held under, and the disk space of the data
directory. A collector rather than gauges set by the code that changes them, so nothing
on the operation path pays for them."""
from __future__ import annotations

import shutil
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from actors.availability import State
from prometheus_client.registry import Collector


class HealthCollector(Collector):
    def __init__(self, engine) -> None:
        self.engine = engine
        self.data_dir = Path(engine.settings.database.data_dir).expanduser()

    def collect(self):
        engine, settings = self.engine, self.engine.settings.engine
        availability = engine.availability
        healthy = engine.writer is not None and engine.writer.healthy and engine.ready and availability.writable()
        yield GaugeMetricFamily("alluse_database_healthy", "1 while writes can commit (the database answers and "
                                "this engine holds the writer lock)", value=1.0 if healthy else 0.0)
        state = GaugeMetricFamily("alluse_database_state", "The database supervisor's state (1 for the current "
                                  "one)", labels=["state"])
        for each in State:
            state.add_metric([each.value], 1.0 if availability.state is each else 0.0)
        yield state
        yield GaugeMetricFamily("alluse_storage_full", "1 while writes are refused because the database's disk is "
                                "full", value=1.0 if availability.state is State.STORAGE_FULL else 0.0)
        yield GaugeMetricFamily("alluse_standby", "1 while this engine waits as a standby (another one writes)",
                                value=1.0 if availability.state in (State.STANDBY, State.NOT_PRIMARY) else 0.0)
        yield CounterMetricFamily("alluse_database_restarts", "Times the engine started its embedded PostgreSQL "
                                  "again after it died", value=availability.restarts)
        yield CounterMetricFamily("alluse_database_outages", "Times the database became unavailable or full",
                                  value=availability.outages)
        yield CounterMetricFamily("alluse_audit_records_dropped", "Outcome records dropped because the audit "
                                  "backlog was full", value=engine.security.records_dropped)
        quarantined = len(engine.registry.quarantined) if engine.registry is not None else 0
        yield GaugeMetricFamily("alluse_quarantined_accounts", "Accounts quarantined now (too many restarts)",
                                value=quarantined)
        yield GaugeMetricFamily("alluse_write_queue_max", "Bound of the writer's queue (engine.write_queue_max)",
                                value=settings.write_queue_max)
        yield GaugeMetricFamily("alluse_operations_in_flight_max", "Bound on operations in flight",
                                value=settings.operations_in_flight_max)
        usage = shutil.disk_usage(_existing(self.data_dir))
        yield GaugeMetricFamily("alluse_data_dir_free_bytes", "Free bytes on the data directory's file system",
                                value=usage.free)
        yield GaugeMetricFamily("alluse_data_dir_size_bytes", "Size of the data directory's file system",
                                value=usage.total)


def _existing(path: Path) -> Path:
    """The data directory, or (before it exists) the nearest parent that does: the file
    system it will live on."""
    path = path.resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def register(engine) -> None:
    """Adds the collector to the engine's registry once."""
    if getattr(engine.metrics, "_health_collector", None) is None:
        engine.metrics._health_collector = HealthCollector(engine)
        engine.metrics.registry.register(engine.metrics._health_collector)
