"""The fault suite (issue 14): the real service (`python -m gateway` with its own embedded
PostgreSQL in a fresh data directory) takes concurrent transfers, each with its own
Idempotency-Key, while a fault is injected:

- the postmaster is SIGKILLed (the engine starts it again by itself within 10 s; the
  service process is never restarted);
- every PostgreSQL process is SIGSTOPped for a while (every request is answered within
  the operation timeout + 1 s, /ready says 503 within 2 s and always answers within
  2 s, the engine recovers after SIGCONT);
- the data directory's file system (a small tmpfs; needs root) fills up (writes are
  refused, then resume by themselves once space is freed);
- a second engine starts on the same data directory (it exits with code 2 and one line;
  with ALLUSE_STANDBY=1 it waits as a hot standby and, when the primary is SIGKILLed,
  is ready within 3 s);

and after each a Jepsen-style bank check runs against the service: every acknowledged
transfer is present with both legs, every re-sent key answers with its original ids,
money is conserved, no balance is negative, every balance equals the sum of its
entries, and the audit chain verifies.

`make test` runs it reduced (shorter faults); `make chaos` (ALLUSE_CHAOS=full) runs every
variant at full length and prints the measured recovery times (also appended, as JSON
lines, to the file named by ALLUSE_CHAOS_REPORT)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.service_harness import Client, Load, Service, bank_check, open_accounts, report

FULL = os.environ.get("ALLUSE_CHAOS", "").strip().lower() == "full"
OWNER = "chaos"
OPERATION_TIMEOUT_S = 10.0        # the default (config/default.toml)
HUNG_S = 15.0 if FULL else 8.0    # how long PostgreSQL stays stopped
READY_ANSWER_S_MAX = 2.0
# What the issue asks of each recovery.
POSTMASTER_RECOVERY_S_MAX = 10.0
READY_503_WITHIN_S = 2.0
TAKEOVER_S_MAX = 3.0
TMPFS_SIZE_MB = 192
STORAGE_RESUME_S_MAX = 20.0


def assert_one_process_tree(service: Service) -> None:
    assert service.process.poll() is None, f"the service died: {service.log_tail()}"


@pytest.fixture
def workspace():
    """A data directory and a log directory; every service started is stopped, and any
    PostgreSQL left on the data directory too."""
    root = tempfile.mkdtemp(prefix="alluse-chaos-")
    data_dir, log_dir = os.path.join(root, "data"), os.path.join(root, "logs")
    os.makedirs(data_dir)
    os.makedirs(log_dir)
    started: list[Service] = []

    def start(*, standby: bool = False, config: str | None = None, data: str | None = None,
              wait: bool = True) -> Service:
        service = Service(data or data_dir, log_dir, standby=standby, config=config, isolated=True).start()
        started.append(service)
        if wait:
            service.wait_until("/ready", 200)
        return service

    start.data_dir, start.root = data_dir, root
    try:
        yield start
    finally:
        for service in reversed(started):
            service.stop()
        for service in started:
            service.stop_postgres()
        shutil.rmtree(root, ignore_errors=True)


# -- the postmaster dies ------------------------------------------------------------------
@pytest.mark.parametrize("everything", [False, True] if FULL else [False],
                         ids=["postmaster", "postmaster-and-backends"][:2 if FULL else 1])
def test_a_killed_postmaster_is_started_again_by_the_engine_within_10_s(workspace, everything):
    service = workspace()
    account_ids = open_accounts(service.port, OWNER)
    load = Load(service.port, account_ids).start()
    try:
        load.wait_for_acknowledged(200)
        processes = service.postgres_processes() if everything else [service.postmaster()]
        engine_pid = service.process.pid
        killed = time.monotonic()
        for process in processes:
            process.send_signal(signal.SIGKILL)
        down = service.wait_until("/ready", 503, timeout_s=5)
        service.wait_until("/ready", 200, timeout_s=30)
        recovered = time.monotonic() - killed
        assert recovered <= POSTMASTER_RECOVERY_S_MAX, recovered
        load.wait_for_acknowledged(100, after=time.monotonic())
    finally:
        load.join()
    assert service.process.pid == engine_pid
    assert_one_process_tree(service)
    codes = {code for status, code, _ in load.refused}
    assert codes <= {"database_unavailable", "account_reloading", "operation_timeout"}, codes
    figures = bank_check(service.port, OWNER, account_ids, load)
    report("postmaster killed" + (" with its backends" if everything else ""), ready_503_after_s=down,
           recovered_s=recovered, refused=len(load.refused), **figures)


# -- the database hangs -------------------------------------------------------------------
def test_a_hung_database_never_holds_a_request_past_its_timeout(workspace):
    service = workspace()
    account_ids = open_accounts(service.port, OWNER)
    load = Load(service.port, account_ids).start()
    ready_answers: list[float] = []
    try:
        load.wait_for_acknowledged(200)
        processes = service.postgres_processes()
        stopped = time.monotonic()
        for process in processes:
            process.send_signal(signal.SIGSTOP)
        try:
            not_ready_after = None
            while time.monotonic() - stopped < HUNG_S:
                asked = time.monotonic()
                status, _ = service.get("/ready", timeout_s=READY_ANSWER_S_MAX + 1)
                ready_answers.append(time.monotonic() - asked)
                if status == 503 and not_ready_after is None:
                    not_ready_after = time.monotonic() - stopped
                time.sleep(0.1)
        finally:
            for process in processes:
                try:
                    process.send_signal(signal.SIGCONT)
                except psutil.NoSuchProcess:
                    pass
        recovered = service.wait_until("/ready", 200, timeout_s=30)
        load.wait_for_acknowledged(100, after=time.monotonic())
    finally:
        load.join()
    assert not_ready_after is not None and not_ready_after <= READY_503_WITHIN_S, not_ready_after
    assert max(ready_answers) <= READY_ANSWER_S_MAX, max(ready_answers)
    slowest = max(seconds for sent, seconds in load.latencies if sent >= stopped - 1)
    assert slowest <= OPERATION_TIMEOUT_S + 1, slowest
    assert_one_process_tree(service)
    assert "never retrieved" not in Path(service.log_path).read_text()
    figures = bank_check(service.port, OWNER, account_ids, load)
    report(f"PostgreSQL stopped {HUNG_S:.0f} s", ready_503_after_s=not_ready_after,
           ready_answer_max_s=max(ready_answers), slowest_request_s=slowest,
           recovered_after_sigcont_s=recovered,
           refused=len(load.refused), **figures)


# -- the disk fills up --------------------------------------------------------------------
@pytest.fixture
def small_file_system():
    """A tmpfs of TMPFS_SIZE_MB for the data directory (root only)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    path = tempfile.mkdtemp(prefix="alluse-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE_MB}m,mode=0755", "tmpfs", path],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(path)
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)
        os.rmdir(path)


def fill(directory: str) -> str:
    """Writes a file until the file system is full; returns its path."""
    path = os.path.join(directory, "filler")
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as file:
        try:
            while True:
                file.write(chunk)
                file.flush()
        except OSError:
            pass
    return path


@pytest.mark.parametrize("threshold_mb", [64, 0] if FULL else [64], ids=["refused-before-full", "postgres-panics"][
    :2 if FULL else 1])
def test_a_full_disk_refuses_writes_and_the_engine_resumes_by_itself(small_file_system, workspace, threshold_mb):
    # `small_file_system` first, so that it is torn down last: `workspace` stops the
    # engine and its PostgreSQL while the tmpfs is still there (unmounted first, the
    # data directory's postmaster.pid was gone and PostgreSQL was left running).
    config = os.path.join(workspace.root, "storage.toml")
    Path(config).write_text(f"[database]\nstorage_free_min_mb = {threshold_mb}\n")
    data = os.path.join(small_file_system, "data")
    service = workspace(data=data, config=config)
    account_ids = open_accounts(service.port, OWNER)
    load = Load(service.port, account_ids).start()
    try:
        load.wait_for_acknowledged(200)
        filled = time.monotonic()
        filler = fill(small_file_system)
        state, refused_full = None, None
        deadline = time.monotonic() + 30
        while state not in ("storage_full", "database_unavailable"):
            assert time.monotonic() < deadline, f"/ready never said the disk is full: {service.log_tail()}"
            status, body = service.get("/ready")
            if status == 503:
                refused_full = refused_full or time.monotonic() - filled
                state = body["error"]["details"]["state"]
            time.sleep(0.05)
        while not any(status == 503 and when > filled for status, _, when in load.refused):
            assert time.monotonic() < deadline, "no write was refused on a full disk"
            time.sleep(0.05)
        time.sleep(2.0)   # a while on a full disk
        freed = time.monotonic()
        os.unlink(filler)
        resumed = service.wait_until("/ready", 200, timeout_s=60)
        assert resumed <= STORAGE_RESUME_S_MAX, resumed
        load.wait_for_acknowledged(100, after=time.monotonic())
    finally:
        load.join()
    assert_one_process_tree(service)
    codes = {code for status, code, when in load.refused if when > filled}
    assert codes & {"storage_full", "database_unavailable"}, codes
    metrics = Client(service.port).request("GET", "/metrics", auth=False)[1].decode()
    assert "alluse_storage_full 0.0" in metrics
    figures = bank_check(service.port, OWNER, account_ids, load)
    report(f"disk full (storage_free_min_mb={threshold_mb})", refused_after_s=refused_full, ready_state=state,
           codes=sorted(codes), resumed_after_free_s=resumed, refused=len(load.refused),
           full_for_s=freed - filled, **figures)


# -- a second engine ----------------------------------------------------------------------
def test_a_second_engine_on_the_same_data_directory_exits_with_one_line_and_code_2(workspace):
    primary = workspace()
    second = workspace(wait=False)
    code = second.process.wait(timeout=60)
    assert code == 2, second.log_tail()
    lines = [line for line in second.log_tail().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("not starting: another engine runs on data directory"), lines
    assert str(primary.process.pid) in lines[0]
    assert primary.get("/ready")[0] == 200
    report("second engine refused", exit_code=code, line=lines[0][:160])


def test_a_hot_standby_takes_over_within_3_s_when_the_primary_dies(workspace):
    primary = workspace()
    account_ids = open_accounts(primary.port, OWNER)
    standby = workspace(standby=True, wait=False)
    standby.wait_until("/health", 200, timeout_s=60)
    status, body = standby.get("/ready")
    assert status == 503 and body["error"]["details"]["state"] == "standby", body
    status, body = standby.get(f"/v1/accounts/{account_ids[0]}")
    assert status == 503 and body["error"]["code"] == "standby", body
    load = Load(primary.port, account_ids).start()
    try:
        load.wait_for_acknowledged(300)
        killed = time.monotonic()
        primary.kill_engine()
        standby.wait_until("/ready", 200, timeout_s=30)
        took_over = time.monotonic() - killed
    finally:
        load.join()
    assert took_over <= TAKEOVER_S_MAX, (took_over, standby.log_tail())
    figures = bank_check(standby.port, OWNER, account_ids, load)
    report("standby takes over", ready_after_primary_killed_s=took_over, **figures)
