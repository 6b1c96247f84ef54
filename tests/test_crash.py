"""The crash test (SPEC section 2, "durable before acknowledged"): the service runs as a
user runs it (`python -m gateway` in the repository root, its own embedded PostgreSQL in
a fresh data directory), takes concurrent transfers, and is killed with SIGKILL in the
middle of them. After a restart on the same data directory every acknowledged transfer
is there, money is conserved, every balance equals the sum of its history, no transfer
is half-applied, replaying acknowledged requests returns their original results without
moving money again, and the audit chain verifies (`bank_check` in
`tests/service_harness.py`, which the fault suite uses too).

Three crashes: only the engine process dies (PostgreSQL keeps running and is adopted on
restart); the engine's whole process group dies (pg_ctl puts PostgreSQL in its own
session, so it survives this too); and the process group plus every PostgreSQL process
die (a power cut: PostgreSQL recovers from its write-ahead log)."""
from __future__ import annotations

import shutil
import tempfile
import time

import pytest

from tests.service_harness import Load, Service, bank_check, open_accounts

OWNER = "crash"
LOAD_S = 2.0
ACKNOWLEDGED_MIN = 50
LOAD_S_MAX = 10.0


@pytest.fixture
def data_dir():
    path = tempfile.mkdtemp(prefix="alluse-crash-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def services(data_dir):
    """Starts services on `data_dir` on request; stops every one of them, and any
    PostgreSQL left on the data directory, whatever happens."""
    started: list[Service] = []

    def start() -> Service:
        service = Service(data_dir).start()
        started.append(service)
        service.wait_ready()
        return service

    try:
        yield start
    finally:
        for service in reversed(started):
            service.stop()
        if started:
            started[-1].stop_postgres()


def run_load_then_crash(service: Service, account_ids: list[str], crash) -> Load:
    load = Load(service.port, account_ids, timeout_s=10.0).start()
    started = time.monotonic()
    while time.monotonic() - started < LOAD_S_MAX:
        if time.monotonic() - started >= LOAD_S and load.acknowledged_after(0) >= ACKNOWLEDGED_MIN:
            break
        load.stopping.wait(0.05)
    crash(service)
    load.join()
    acknowledged = load.acknowledged_after(0)
    assert acknowledged >= ACKNOWLEDGED_MIN, (f"too little load before the crash: {acknowledged} acknowledged, "
                                              f"refusals {load.refused[:5]}")
    return load


def crash_engine_only(service: Service) -> None:
    service.kill_engine()
    assert service.postmaster() is not None, "PostgreSQL should outlive the engine"


def crash_process_group(service: Service) -> None:
    service.kill_group()


def crash_process_group_and_postgres(service: Service) -> None:
    service.kill_group()
    service.kill_postgres()
    assert service.postmaster() is None


@pytest.mark.parametrize("crash", [crash_engine_only, crash_process_group, crash_process_group_and_postgres],
                         ids=["engine-only", "process-group", "process-group-and-postgres"])
def test_every_acknowledged_transfer_survives_a_sigkill_and_money_is_conserved(services, crash):
    service = services()
    account_ids = open_accounts(service.port, OWNER)
    load = run_load_then_crash(service, account_ids, crash)
    restarted = services()
    bank_check(restarted.port, OWNER, account_ids, load)
