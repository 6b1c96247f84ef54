"""The crash test (SPEC section 2, "durable before acknowledged"): the service runs as a
user runs it (`python -m gateway` in the repository root, its own embedded PostgreSQL in
a fresh data directory), takes concurrent transfers, and is killed with SIGKILL in the
middle of them. After a restart on the same data directory every acknowledged transfer
is there, money is conserved, every balance equals the sum of its history, no transfer
is half-applied, and replaying acknowledged requests returns their original results
without moving money again.

Three crashes: only the engine process dies (PostgreSQL keeps running and is adopted on
restart); the engine's whole process group dies (pg_ctl puts PostgreSQL in its own
session, so it survives this too); and the process group plus every PostgreSQL process
die (a power cut: PostgreSQL recovers from its write-ahead log)."""
from __future__ import annotations

import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "crash-test-admin-token-0123456789"
ACCOUNTS = 10
FUNDING_CENTS = 1_000_000
LOAD_THREADS = 8
LOAD_S = 2.0
ACKNOWLEDGED_MIN = 50
LOAD_S_MAX = 10.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _reaped(pid: int) -> bool:
    return not psutil.pid_exists(pid)


def _wait_gone(pids: list[int], timeout_s: float, gone=lambda pid: not _alive(pid)) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


class Client:
    """One keep-alive HTTP connection to the service (standard library only)."""

    def __init__(self, port: int, timeout_s: float = 30.0):
        self.port = port
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: dict | None = None, key: str | None = None,
                auth: bool = True) -> tuple[int, object]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            headers["Authorization"] = f"Bearer {TOKEN}"
        if key is not None:
            headers["Idempotency-Key"] = key
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
        try:
            self.connection.request(method, path, body=data, headers=headers)
            response = self.connection.getresponse()
            payload = response.read()
        except BaseException:
            self.close()
            raise
        parsed = json.loads(payload) if payload and response.getheader("Content-Type", "").startswith(
            "application/json") else payload
        assert response.status != 500, (method, path, payload[:500])
        return response.status, parsed

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def ok(self, path: str) -> dict:
        status, body = self.request("GET", path)
        assert status == 200, (path, status, body)
        return body

    def created(self, path: str, body: dict) -> dict:
        status, reply = self.request("POST", path, body, key=str(uuid.uuid4()))
        assert status == 201, (path, body, status, reply)
        return reply

    def pages(self, path: str, limit: int = 500) -> list[dict]:
        items, cursor = [], None
        for _ in range(10_000):
            separator = "&" if "?" in path else "?"
            page = self.ok(f"{path}{separator}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return items
        raise AssertionError("pagination did not end")


class Service:
    """`python -m gateway` in its own process group, on a data directory that outlives it."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.log_path = os.path.join(data_dir, "service.log")
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "Service":
        self.port = free_port()
        environment = dict(os.environ)
        environment.pop("DATABASE_URL", None)
        environment.pop("ALLUSE_CONFIG", None)
        environment.update({"ALLUSE_PORT": str(self.port), "ALLUSE_HOST": "127.0.0.1",
                            "ALLUSE_DATA_DIR": self.data_dir, "ALLUSE_ADMIN_TOKEN": TOKEN})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=REPO_ROOT, env=environment,
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        client = Client(self.port, timeout_s=5.0)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"the service exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    status, _ = client.request("GET", "/ready", auth=False)
                    if status == 200:
                        return
                except OSError:
                    pass
                time.sleep(0.1)
        finally:
            client.close()
        raise AssertionError(f"the service was not ready in {timeout_s} s: {self.log_tail()}")

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-characters:].decode(errors="replace")
        except OSError:
            return ""

    def kill_engine(self) -> None:
        """SIGKILL the engine process only."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def kill_group(self) -> None:
        """SIGKILL the engine's whole process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def stop(self) -> None:
        """SIGTERM the group (a graceful shutdown), then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill_group()
        except ProcessLookupError:
            pass

    # -- the embedded PostgreSQL on our data directory ---------------------------------
    def postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "pg", "postmaster.pid")) as file:
                pid = int(file.readline())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster and all its processes at once (a power cut)."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            postmaster = psutil.Process(pid)
            processes = [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        # Wait until they are reaped too, as after a real power cut: a dead postmaster left
        # as a zombie (our init reaps orphans only every few seconds) still looks like a
        # running server to the wheel, which then adopts it instead of starting one.
        assert _wait_gone([p.pid for p in processes], STOP_TIMEOUT_S, gone=_reaped), "PostgreSQL survived SIGKILL"

    def stop_postgres(self) -> None:
        """SIGINT (fast shutdown) whatever PostgreSQL still runs on our data directory."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        if not _wait_gone([pid], STOP_TIMEOUT_S):
            self.kill_postgres()


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


class Load:
    """Concurrent transfers between the accounts, each with its own Idempotency-Key, from
    several threads; keeps every request that was acknowledged (201) with its reply."""

    def __init__(self, port: int, account_ids: list[str]):
        self.port = port
        self.account_ids = account_ids
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.acknowledged: list[tuple[str, dict, dict]] = []   # (key, body, reply)
        self.unknown: list[tuple[str, dict]] = []             # sent, no reply (the crash)
        self.refused: list[tuple[int, object]] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(LOAD_THREADS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _run(self, seed: int) -> None:
        chooser = random.Random(seed)
        client = Client(self.port, timeout_s=10.0)
        try:
            while not self.stopping.is_set():
                source, target = chooser.sample(self.account_ids, 2)
                body = {"from_account": source, "to_account": target, "amount": chooser.randint(1, 5_000)}
                key = str(uuid.uuid4())
                try:
                    status, reply = client.request("POST", "/v1/transfers", body, key=key)
                except (OSError, http.client.HTTPException):
                    with self.lock:
                        self.unknown.append((key, body))
                    return
                with self.lock:
                    if status == 201:
                        self.acknowledged.append((key, body, reply))
                    else:
                        self.refused.append((status, reply))
        finally:
            client.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def join(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15.0)
            assert not thread.is_alive(), "a load thread hung"


def open_accounts(client: Client) -> list[str]:
    ids = []
    for index in range(ACCOUNTS):
        account = client.created("/v1/accounts", {"name": f"crash-{index}", "owner": "crash",
                                                  "type": ("revenue", "generation")[index % 2]})
        client.created(f"/v1/accounts/{account['id']}/deposits", {"amount": FUNDING_CENTS})
        ids.append(account["id"])
    return ids


def run_load_then_crash(service: Service, account_ids: list[str], crash) -> Load:
    load = Load(service.port, account_ids)
    load.start()
    started = time.monotonic()
    while time.monotonic() - started < LOAD_S_MAX:
        if time.monotonic() - started >= LOAD_S and load.count() >= ACKNOWLEDGED_MIN:
            break
        load.stopping.wait(0.05)
    crash(service)
    load.join()
    assert load.count() >= ACKNOWLEDGED_MIN, (f"too little load before the crash: {load.count()} acknowledged, "
                                              f"refusals {load.refused[:5]}")
    return load


def in_parallel(port: int, function, items, workers: int = 4) -> list:
    """Runs `function(client, item)` over items on a few threads, one connection each."""
    local = threading.local()
    clients: list[Client] = []

    def call(item):
        if not hasattr(local, "client"):
            local.client = Client(port)
            clients.append(local.client)
        return function(local.client, item)

    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(call, items))
    finally:
        for client in clients:
            client.close()


def check_after_restart(service: Service, account_ids: list[str], load: Load) -> None:
    client = Client(service.port)
    try:
        # Every acknowledged transfer is there, each leg exactly as acknowledged.
        legs = [leg for _, _, reply in load.acknowledged for leg in reply["legs"]]
        stored = in_parallel(service.port, lambda c, leg: c.request("GET", f"/v1/transactions/{leg['id']}"), legs)
        for leg, (status, body) in zip(legs, stored):
            assert status == 200, (leg, status, body)
            assert body == leg

        # Money is conserved and every balance is the sum of its history.
        accounts = {a["id"]: a for a in client.pages("/v1/accounts?owner=crash")}
        assert sorted(accounts) == sorted(account_ids)
        assert sum(a["balance"] for a in accounts.values()) == ACCOUNTS * FUNDING_CENTS
        by_correlation: dict[str, list[dict]] = defaultdict(list)
        for account_id, account in accounts.items():
            history = client.pages(f"/v1/accounts/{account_id}/transactions")
            running = 0
            for entry in reversed(history):
                running += entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
                assert entry["balance_after"] == running, entry
                if entry["kind"] == "transfer":
                    by_correlation[entry["correlation_id"]].append(entry)
            assert running == account["balance"], account_id
            assert history[0]["balance_after"] == account["balance"]

        # No transfer is half-applied: each has its debit and its matching credit.
        for correlation_id, entries in by_correlation.items():
            assert len(entries) == 2, entries
            debit, credit = sorted(entries, key=lambda e: e["direction"] != "debit")
            assert (debit["direction"], credit["direction"]) == ("debit", "credit"), entries
            assert debit["amount"] == credit["amount"]
            assert debit["counterparty_account_id"] == credit["account_id"]
            assert credit["counterparty_account_id"] == debit["account_id"]
        assert {reply["id"] for _, _, reply in load.acknowledged} <= set(by_correlation)

        # A replay of an acknowledged request returns its original result and moves nothing.
        balances = {account_id: a["balance"] for account_id, a in accounts.items()}
        replies = in_parallel(service.port, lambda c, item: c.request("POST", "/v1/transfers", item[1], key=item[0]),
                              load.acknowledged)
        for (key, body, original), (status, reply) in zip(load.acknowledged, replies):
            assert status in (200, 201), (key, status, reply)
            assert reply["id"] == original["id"]
            assert [leg["id"] for leg in reply["legs"]] == [leg["id"] for leg in original["legs"]]
            assert reply == original
        after = {a["id"]: a["balance"] for a in client.pages("/v1/accounts?owner=crash")}
        assert after == balances

        # A request in flight at the crash has an unknown outcome; retried with its key it
        # is applied exactly once (now or before the crash), and a second retry agrees.
        for key, body in load.unknown:
            status, first = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201), (key, status, first)
            status, second = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201) and second == first
            for leg in first["legs"]:
                assert client.ok(f"/v1/transactions/{leg['id']}") == leg
        final = client.pages("/v1/accounts?owner=crash")
        assert sum(a["balance"] for a in final) == ACCOUNTS * FUNDING_CENTS
    finally:
        client.close()


def crash_engine_only(service: Service) -> None:
    service.kill_engine()
    assert service.postmaster_pid() is not None, "PostgreSQL should outlive the engine"


def crash_process_group(service: Service) -> None:
    service.kill_group()


def crash_process_group_and_postgres(service: Service) -> None:
    service.kill_group()
    service.kill_postgres()
    assert service.postmaster_pid() is None


@pytest.mark.parametrize("crash", [crash_engine_only, crash_process_group, crash_process_group_and_postgres],
                         ids=["engine-only", "process-group", "process-group-and-postgres"])
def test_every_acknowledged_transfer_survives_a_sigkill_and_money_is_conserved(services, crash):
    service = services()
    client = Client(service.port)
    try:
        account_ids = open_accounts(client)
    finally:
        client.close()
    load = run_load_then_crash(service, account_ids, crash)
    restarted = services()
    check_after_restart(restarted, account_ids, load)
