"""The real service under test, as a user runs it: `python -m gateway` in the repository
root with its own embedded PostgreSQL on a data directory that outlives it, an HTTP
client of the standard library, a load of keyed transfers from several threads, and the
Jepsen-style bank check that follows a fault.

Shared by the crash test (`tests/test_crash.py`: SIGKILL), the fault suite
(`tests/test_chaos.py`: PostgreSQL killed, hung, out of disk; a second engine, a
standby) and the webhook crash test (`tests/test_webhooks_crash.py`)."""
from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKEN = "crash-test-admin-token-0123456789"
ACCOUNTS = 10
FUNDING_CENTS = 1_000_000
LOAD_THREADS = 8
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reaped(pid: int) -> bool:
    return not psutil.pid_exists(pid)


def wait_gone(pids: list[int], timeout_s: float, gone=lambda pid: not alive(pid)) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return False


def report(scenario: str, **figures) -> None:
    """Prints a measurement (`make chaos` shows it) and appends it to ALLUSE_CHAOS_REPORT."""
    line = {"scenario": scenario, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items()}}
    print(f"\nchaos: {json.dumps(line)}", flush=True)
    path = os.environ.get("ALLUSE_CHAOS_REPORT")
    if path:
        with open(path, "a") as file:
            file.write(json.dumps(line) + "\n")


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


class Service:
    """`python -m gateway` in its own session (process group) on `data_dir`; its log goes
    to `log_dir` (by default the data directory; the fault suite keeps it apart, since
    its data directory may be a tiny file system).

    The environment is this process's, without DATABASE_URL and ALLUSE_CONFIG (so the
    service runs on its own embedded PostgreSQL), or with `isolated` without any ALLUSE_
    variable at all."""

    def __init__(self, data_dir: str, log_dir: str | None = None, *, standby: bool = False,
                 config: str | None = None, isolated: bool = False):
        self.data_dir, self.standby, self.config, self.isolated = data_dir, standby, config, isolated
        self.log_path = os.path.join(log_dir or data_dir, f"service-{uuid.uuid4().hex[:6]}.log")
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> "Service":
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("DATABASE_URL", "ALLUSE_CONFIG") and not (self.isolated and k.startswith("ALLUSE_"))}
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

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        return self.wait_until("/ready", 200, timeout_s)

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return Path(self.log_path).read_bytes()[-characters:].decode(errors="replace")
        except OSError:
            return ""

    def kill_engine(self) -> None:
        """SIGKILL the engine process only (PostgreSQL runs in a session of its own)."""
        if self.process.poll() is None:
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

    # -- the embedded PostgreSQL on the data directory -----------------------------------
    def postmaster(self) -> psutil.Process | None:
        try:
            with open(os.path.join(self.data_dir, "pg", "postmaster.pid")) as file:
                pid = int(file.readline())
        except (OSError, ValueError):
            return None
        try:
            return psutil.Process(pid) if alive(pid) else None
        except psutil.NoSuchProcess:
            return None

    def postgres_processes(self) -> list[psutil.Process]:
        postmaster = self.postmaster()
        if postmaster is None:
            return []
        try:
            return [postmaster, *postmaster.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill_postgres(self) -> None:
        """SIGKILL the postmaster and all its processes at once (a power cut)."""
        processes = self.postgres_processes()
        for process in processes:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        # Wait until they are reaped too, as after a real power cut: a dead postmaster left
        # as a zombie (our init reaps orphans only every few seconds) still looks like a
        # running server to the wheel, which then adopts it instead of starting one.
        assert wait_gone([p.pid for p in processes], STOP_TIMEOUT_S, gone=reaped), "PostgreSQL survived SIGKILL"

    def stop_postgres(self) -> None:
        """Whatever PostgreSQL still runs on the data directory: continued if stopped, a
        fast shutdown, then SIGKILL (only the processes of this data directory)."""
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
        if not wait_gone([processes[0].pid], STOP_TIMEOUT_S):
            for process in processes:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            wait_gone([p.pid for p in processes], STOP_TIMEOUT_S, gone=reaped)


class Load:
    """Transfers between the accounts from several threads, each with a fresh key; keeps
    what was acknowledged (201, with its reply), refused (status, code) and unknown (sent,
    no answer: a crash or a lost connection), and every request's latency. A thread goes
    on after a refused connection or a lost answer until `join`."""

    def __init__(self, port: int, account_ids: list[str], threads: int = LOAD_THREADS, timeout_s: float = 60.0):
        self.port, self.account_ids, self.timeout_s = port, account_ids, timeout_s
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
        client = Client(self.port, timeout_s=self.timeout_s)
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


def open_accounts(port: int, owner: str) -> list[str]:
    """ACCOUNTS accounts of `owner` (revenue and generation in turn), each funded with
    FUNDING_CENTS."""
    client = Client(port)
    try:
        ids = []
        for index in range(ACCOUNTS):
            account = client.created("/v1/accounts", {"name": f"{owner}-{index}", "owner": owner,
                                                      "type": ("revenue", "generation")[index % 2]})
            client.created(f"/v1/accounts/{account['id']}/deposits", {"amount": FUNDING_CENTS})
            ids.append(account["id"])
        return ids
    finally:
        client.close()


def bank_check(port: int, owner: str, account_ids: list[str], load: Load) -> dict:
    """The Jepsen-style check after a fault, through the API of the engine that serves
    now: requests without an answer are settled with their keys (applied exactly once,
    now or before; a second retry agrees); then every acknowledged transfer is there with
    both legs exactly as acknowledged, money is conserved, no balance is negative, every
    balance is the sum of its entries, no transfer is half-applied, every re-sent key
    answers with its original transfer and moves nothing, and the audit chain verifies."""
    client = Client(port)
    try:
        settled = []
        for key, body in load.unknown:
            status, first = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201), (key, status, first)
            status, second = client.request("POST", "/v1/transfers", body, key=key)
            assert status in (200, 201) and second == first, (first, second)
            settled.append((key, body, first))
        acknowledged = [(key, body, reply) for key, body, reply, _ in load.acknowledged] + settled

        legs = [leg for _, _, reply in acknowledged for leg in reply["legs"]]
        stored = in_parallel(port, lambda c, leg: c.request("GET", f"/v1/transactions/{leg['id']}"), legs)
        for leg, (status, body) in zip(legs, stored):
            assert status == 200 and body == leg, (leg, status, body)
        assert all(len(reply["legs"]) == 2 for _, _, reply in acknowledged)

        accounts = {a["id"]: a for a in client.pages(f"/v1/accounts?owner={owner}")}
        assert sorted(accounts) == sorted(account_ids)
        assert sum(a["balance"] for a in accounts.values()) == ACCOUNTS * FUNDING_CENTS
        assert all(a["balance"] >= 0 for a in accounts.values())
        by_correlation: dict[str, list[dict]] = defaultdict(list)
        for account_id, account in accounts.items():
            history = client.pages(f"/v1/accounts/{account_id}/transactions")
            running = 0
            for entry in reversed(history):
                running += entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
                assert entry["balance_after"] == running >= 0, entry
                if entry["kind"] == "transfer":
                    by_correlation[entry["correlation_id"]].append(entry)
            assert running == account["balance"] == history[0]["balance_after"], account_id
        for entries in by_correlation.values():
            assert len(entries) == 2, entries
            debit, credit = sorted(entries, key=lambda e: e["direction"] != "debit")
            assert (debit["direction"], credit["direction"]) == ("debit", "credit"), entries
            assert debit["amount"] == credit["amount"]
            assert debit["counterparty_account_id"] == credit["account_id"]
            assert credit["counterparty_account_id"] == debit["account_id"]
        assert {reply["id"] for _, _, reply in acknowledged} <= set(by_correlation)

        replies = in_parallel(port, lambda c, item: c.request("POST", "/v1/transfers", item[1], key=item[0]),
                              acknowledged)
        for (key, _, original), (status, reply) in zip(acknowledged, replies):
            assert status in (200, 201) and reply == original, (key, status, reply, original)
        after = {a["id"]: a["balance"] for a in client.pages(f"/v1/accounts?owner={owner}")}
        assert after == {account_id: a["balance"] for account_id, a in accounts.items()}

        verdict = client.ok("/v1/audit/verify")
        assert verdict["valid"], verdict
        return {"acknowledged": len(acknowledged), "transfers_in_books": len(by_correlation),
                "audit_records": verdict["records"]}
    finally:
        client.close()
