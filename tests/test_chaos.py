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

import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import psutil
import pytest

from tests.test_crash import REPO_ROOT, TOKEN, Client, _alive, _reaped, _wait_gone, free_port, in_parallel

FULL = os.environ.get("ALLUSE_CHAOS", "").strip().lower() == "full"
ACCOUNTS = 10
FUNDING_CENTS = 1_000_000
LOAD_THREADS = 8
OPERATION_TIMEOUT_S = 10.0        # the default (config/default.toml)
HUNG_S = 15.0 if FULL else 8.0    # how long PostgreSQL stays stopped
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
# What the issue asks of each recovery.
POSTMASTER_RECOVERY_S_MAX = 10.0
READY_503_WITHIN_S = 2.0
READY_ANSWER_S_MAX = 2.0
TAKEOVER_S_MAX = 3.0
TMPFS_SIZE_MB = 192
STORAGE_RESUME_S_MAX = 20.0


def report(scenario: str, **figures) -> None:
    """Prints a measurement (`make chaos` shows it) and appends it to ALLUSE_CHAOS_REPORT."""
    line = {"scenario": scenario, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}}
    print(f"\nchaos: {json.dumps(line)}", flush=True)
    path = os.environ.get("ALLUSE_CHAOS_REPORT")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps(line) + "\n")


class Service:
    """`python -m gateway` in its own session on a data directory that outlives it; its
    log goes next to (not into) the data directory, which may be a tiny file system."""

    def __init__(self, data_dir: str, log_dir: str, *, standby: bool = False, config: str | None = None):
        self.data_dir, self.standby, self.config = data_dir, standby, config
        self.log_path = os.path.join(log_dir, f"service-{uuid.uuid4().hex[:6]}.log")
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "Service":
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("ALLUSE_") and k != "DATABASE_URL"}
        environment.update({"ALLUSE_PORT": str(self.port), "ALLUSE_HOST": "127.0.0.1",
                            "ALLUSE_DATA_DIR": self.data_dir, "ALLUSE_ADMIN_TOKEN": TOKEN})
        if self.standby:
            environment["ALLUSE_STANDBY"] = "1"
        if self.config:
            environment["ALLUSE_CONFIG"] = self.config
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=REPO_ROOT, env=environment,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self

    def get(self, path: str, timeout_s: float = 5.0) -> tuple[int, dict]:
        client = Client(self.port, timeout_s=timeout_s)
        try:
            return client.request("GET", path, auth=not path.startswith(("/ready", "/health")))
        finally:
            client.close()

    def wait_until(self, path: str, status: int, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Polls `path` until it answers `status`; returns the seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise AssertionError(f"the service exited with {self.process.returncode}: {self.log_tail()}")
            try:
                if self.get(path, timeout_s=2.0)[0] == status:
                    return time.monotonic() - started
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.02)
        raise AssertionError(f"{path} did not answer {status} in {timeout_s} s: {self.log_tail()}")

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-characters:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the engine process only (PostgreSQL runs in a session of its own)."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except ProcessLookupError:
            pass

    # -- the embedded PostgreSQL -------------------------------------------------------
    def postmaster(self) -> psutil.Process | None:
        try:
            with open(os.path.join(self.data_dir, "pg", "postmaster.pid")) as file:
                pid = int(file.readline())
        except (OSError, ValueError):
            return None
        return psutil.Process(pid) if _alive(pid) else None

    def postgres_processes(self) -> list[psutil.Process]:
        postmaster = self.postmaster()
        if postmaster is None:
            return []
        try:
            return [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop_postgres(self) -> None:
        """Whatever PostgreSQL still runs on the data directory: a fast shutdown, then
        SIGKILL (only the processes of this data directory)."""
        processes = self.postgres_processes()
        if not processes:
            return
        for process in processes:
            try:
                process.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        try:
            processes[0].send_signal(signal.SIGINT)
        except psutil.NoSuchProcess:
            return
        if not _wait_gone([processes[0].pid], STOP_TIMEOUT_S):
            for process in processes:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            _wait_gone([p.pid for p in processes], STOP_TIMEOUT_S, gone=_reaped)


class Load:
    """Transfers between the accounts from several threads, each with a fresh key; keeps
    what was acknowledged (201, with its reply), refused (status, code) and unknown (no
    answer), and every request's latency."""

    def __init__(self, port: int, account_ids: list[str], threads: int = LOAD_THREADS):
        self.port, self.account_ids = port, account_ids
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged: list[tuple[str, dict, dict, float]] = []   # key, body, reply, when
        self.unknown: list[tuple[str, dict]] = []
        self.refused: list[tuple[int, str, float]] = []              # status, code, when
        self.latencies: list[tuple[float, float]] = []               # (sent at, seconds)
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def start(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, seed: int) -> None:
        chooser = random.Random(seed)
        client = Client(self.port, timeout_s=60.0)
        try:
            while not self.stopping.is_set():
                source, target = chooser.sample(self.account_ids, 2)
                body = {"from_account": source, "to_account": target, "amount": chooser.randint(1, 5_000)}
                key = str(uuid.uuid4())
                sent = time.monotonic()
                try:
                    status, reply = client.request("POST", "/v1/transfers", body, key=key)
                except ConnectionRefusedError:
                    if self.stopping.wait(0.05):   # never sent: nothing to settle
                        return
                    continue
                except (OSError, http.client.HTTPException):
                    with self.lock:
                        self.unknown.append((key, body))
                    if self.stopping.wait(0.05):
                        return
                    continue
                now = time.monotonic()
                with self.lock:
                    self.latencies.append((sent, now - sent))
                    if status == 201:
                        self.acknowledged.append((key, body, reply, now))
                    else:
                        code = reply.get("error", {}).get("code") if isinstance(reply, dict) else str(status)
                        self.refused.append((status, code, now))
                if status == 503:
                    self.stopping.wait(0.02)   # as a client honouring Retry-After would, briefly
        finally:
            client.close()

    def acknowledged_after(self, moment: float) -> int:
        with self.lock:
            return sum(1 for *_, when in self.acknowledged if when > moment)

    def wait_for_acknowledged(self, count: int, after: float = 0.0, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.acknowledged_after(after) < count:
            assert time.monotonic() < deadline, f"fewer than {count} transfers acknowledged: {self.refused[-5:]}"
            time.sleep(0.05)

    def join(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90.0)
            assert not thread.is_alive(), "a load thread hung"


def open_accounts(service: Service) -> list[str]:
    client = Client(service.port)
    try:
        ids = []
        for index in range(ACCOUNTS):
            account = client.created("/v1/accounts", {"name": f"chaos-{index}", "owner": "chaos",
                                                      "type": ("revenue", "generation")[index % 2]})
            client.created(f"/v1/accounts/{account['id']}/deposits", {"amount": FUNDING_CENTS})
            ids.append(account["id"])
        return ids
    finally:
        client.close()


def bank_check(service: Service, account_ids: list[str], load: Load) -> dict:
    """The Jepsen-style check, through the API of the engine that serves now."""
    port = service.port
    client = Client(port)
    try:
        # Requests without an answer have an unknown outcome: settle each with its key
        # (applied exactly once, now or before), and a second retry agrees.
        settled = []
        for key, body in load.unknown:
            status, first = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201), (key, status, first)
            status, second = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201) and second == first, (first, second)
            settled.append((key, body, first))
        acknowledged = [(key, body, reply) for key, body, reply, _ in load.acknowledged] + settled

        # Every acknowledged transfer is there with both legs, exactly as acknowledged.
        legs = [leg for _, _, reply in acknowledged for leg in reply["legs"]]
        stored = in_parallel(port, lambda c, leg: c.request("GET", f"/v1/transactions/{leg['id']}"), legs)
        for leg, (status, body) in zip(legs, stored):
            assert status == 200 and body == leg, (leg, status, body)
        assert all(len(reply["legs"]) == 2 for _, _, reply in acknowledged)

        # Money is conserved, no balance is negative, each balance is the sum of its
        # entries, and no transfer is half-applied.
        accounts = {a["id"]: a for a in client.pages("/v1/accounts?owner=chaos")}
        assert sorted(accounts) == sorted(account_ids)
        assert sum(a["balance"] for a in accounts.values()) == ACCOUNTS * FUNDING_CENTS
        assert all(a["balance"] >= 0 for a in accounts.values())
        by_correlation: dict[str, list[dict]] = defaultdict(list)
        for account_id, account in accounts.items():
            running = 0
            for entry in reversed(client.pages(f"/v1/accounts/{account_id}/transactions")):
                running += entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
                assert entry["balance_after"] == running >= 0, entry
                if entry["kind"] == "transfer":
                    by_correlation[entry["correlation_id"]].append(entry)
            assert running == account["balance"], account_id
        for entries in by_correlation.values():
            assert sorted(e["direction"] for e in entries) == ["credit", "debit"], entries
            assert entries[0]["amount"] == entries[1]["amount"]
        assert {reply["id"] for _, _, reply in acknowledged} <= set(by_correlation)

        # Every re-sent key answers with its original transfer and legs, moving nothing.
        replies = in_parallel(port, lambda c, item: c.request("POST", "/v1/transfers", item[1], key=item[0]),
                              acknowledged)
        for (key, _, original), (status, reply) in zip(acknowledged, replies):
            assert status in (200, 201) and reply == original, (key, status, reply, original)
        after = {a["id"]: a["balance"] for a in client.pages("/v1/accounts?owner=chaos")}
        assert after == {account_id: a["balance"] for account_id, a in accounts.items()}

        verdict = client.ok("/v1/audit/verify")
        assert verdict["valid"], verdict
        return {"acknowledged": len(acknowledged), "transfers_in_books": len(by_correlation),
                "audit_records": verdict["records"]}
    finally:
        client.close()


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
        service = Service(data or data_dir, log_dir, standby=standby, config=config).start()
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
    account_ids = open_accounts(service)
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
    figures = bank_check(service, account_ids, load)
    report("postmaster killed" + (" with its backends" if everything else ""), ready_503_after_s=down,
           recovered_s=recovered, refused=len(load.refused), **figures)


# -- the database hangs -------------------------------------------------------------------
def test_a_hung_database_never_holds_a_request_past_its_timeout(workspace):
    service = workspace()
    account_ids = open_accounts(service)
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
    figures = bank_check(service, account_ids, load)
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
    account_ids = open_accounts(service)
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
    figures = bank_check(service, account_ids, load)
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
    account_ids = open_accounts(primary)
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
        primary.kill()
        standby.wait_until("/ready", 200, timeout_s=30)
        took_over = time.monotonic() - killed
    finally:
        load.join()
    assert took_over <= TAKEOVER_S_MAX, (took_over, standby.log_tail())
    figures = bank_check(standby, account_ids, load)
    report("standby takes over", ready_after_primary_killed_s=took_over, **figures)
