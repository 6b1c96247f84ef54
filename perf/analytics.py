"""`python -m perf.analytics [--entries N] [--requests N] [--weeks N]`

Latency of the analytics routes over HTTP against the issue's target (p99 <= 50 ms for an
account with 10,000 ledger entries):

1. **setup, in-process**: a fresh embedded PostgreSQL (`perf.bench.Database`) and an
   `Engine` on it; one root portfolio opened `--weeks` weeks ago (default 200) whose
   Rev-Acc gets `--entries` trades (default 10,000: premiums, every 20th a fee, every
   50th a loss) spread evenly over those weeks with back-dated `effective_date`s, and
   whose Gen-Acc and Com-Acc get one premium a week. Trades of one week share their
   date and go in concurrently (the writer commits them in groups); weeks go in order,
   since effective dates never go backwards. The engine is then stopped.
2. **service**: `python -m gateway` as a subprocess on 127.0.0.1 with `DATABASE_URL`
   pointing at that database (`perf.bench.Service`).
3. **measure**: one keep-alive client, requests one after another (latency, not
   throughput): the first request of each route (timed on its own: the service has not
   read that ledger yet), a warm-up, then `--requests` GETs (default 200) of each route:
   `/v1/accounts/{rev}/analytics`, the same with `?weeks=13`,
   `/v1/portfolios/{id}/analytics`, and that once more with a premium booked on the
   Rev-Acc (untimed) before each GET, so every request has a new entry to take in (the
   service keeps each account's weekly sums and reads only the entries committed since,
   `persistence/ledger_weeks.py`). Every reply must be 200 (201 for the trades).

Prints a table (first request, p50/p95/p99/max in ms against the 50 ms p99 target, and
the CPU time of the service and of PostgreSQL per timed request) and writes
`perf/results/analytics-<timestamp>.json`. Every phase is bounded in time; the service,
PostgreSQL and the temporary directory are stopped and removed at the end, also on
Ctrl-C or SIGTERM. Exit status 0 when every route met the target, 1 otherwise, 2 on an
error.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from perf.common import RESULTS_DIR, Database, Service, cpu_sample, progress, run_main, shown_path

TARGET_P99_MS = 50.0
SETUP_TIMEOUT_S = 120.0
MEASURE_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 10.0
WARMUP_REQUESTS = 10
# The route measured with a new trade on its Rev-Acc before each request.
TRADED_SUFFIX = ", a trade before each"
CAPITAL_CENTS = 1_000_000_00   # Gen-Acc $400,000 (default fork threshold $50,000 is never reached below)


def _percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, min(len(sorted_ms), round(q * len(sorted_ms) + 0.5)))
    return sorted_ms[rank - 1]


# -- 1. setup --------------------------------------------------------------------------
async def populate(url: str, entries: int, weeks: int) -> dict:
    """The portfolio and its history; returns ids and counts."""
    from actors.api import Engine
    from actors.settings import load_settings

    settings = load_settings({}, {"database": {"url": url}, "engine": {"reinvest_schedule": False}})
    async with Engine(settings) as engine:
        today = datetime.now(timezone.utc).date()
        opened = today - timedelta(weeks=weeks)
        portfolio = await engine.create_portfolio(name="analytics-bench", owner="bench",
                                                  initial_capital=CAPITAL_CENTS, opened_on=opened)
        ids = {a.type: a.id for a in portfolio.accounts}
        per_week, extra = divmod(entries, weeks)
        booked = 0
        for week in range(1, weeks + 1):
            day = opened + timedelta(weeks=week)
            count = per_week + (1 if week <= extra else 0)
            calls = []
            for i in range(count):
                number = booked + i
                kind = "loss" if number % 50 == 49 else "fee" if number % 20 == 19 else "premium"
                amount = {"premium": 150_00, "fee": 2_00, "loss": 100_00}[kind]
                calls.append(engine.book_trade(ids["revenue"], kind=kind, amount=amount, effective_date=day))
            # the other accounts: one premium a week, so the portfolio has a history too
            calls.append(engine.book_trade(ids["generation"], kind="premium", amount=50_00, effective_date=day))
            calls.append(engine.book_trade(ids["compounding"], kind="premium", amount=30_00, effective_date=day))
            await asyncio.gather(*calls)
            booked += count
        rows = await engine.store.fetch("SELECT account_id, count(*) AS n FROM entries GROUP BY account_id")
        counts = {row["account_id"]: row["n"] for row in rows}
    return {"portfolio": portfolio.id, "revenue": ids["revenue"], "entries": counts.get(ids["revenue"], 0),
            "portfolio_entries": sum(counts.values())}


# -- 3. measure --------------------------------------------------------------------------
async def measure(base: str, token: str, paths: dict[str, str], requests: int,
                  trade_on: str | None = None, cpu=None) -> dict[str, dict]:
    """Each route: its first request (`first_ms`: nothing of it cached yet), a warm-up,
    then `requests` timed GETs. A route whose name ends in TRADED_SUFFIX gets a premium
    booked on `trade_on` (untimed) before each GET, so every timed request has a new
    entry to take in. `cpu()` (CPU seconds of the service and of PostgreSQL so far) gives
    the CPU per timed request, the steadier figure on a shared machine (for the traded
    route it includes the trade's)."""
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    figures: dict[str, dict] = {}
    async with aiohttp.ClientSession(base_url=base, headers=headers, timeout=timeout) as session:
        for name, path in paths.items():
            latencies: list[float] = []
            size, first_ms, cpu_before = 0, None, None
            for index in range(WARMUP_REQUESTS + requests):
                if index == WARMUP_REQUESTS and cpu is not None:
                    cpu_before = cpu()
                if name.endswith(TRADED_SUFFIX):
                    async with session.post(f"/v1/accounts/{trade_on}/trades",
                                            json={"kind": "premium", "amount": 1_00}) as response:
                        if response.status != 201:
                            raise RuntimeError(f"a trade answered {response.status}: {await response.text()}")
                started = time.perf_counter()
                async with session.get(path) as response:
                    body = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"GET {path} answered {response.status}: {body[:300]!r}")
                elapsed = (time.perf_counter() - started) * 1000
                first_ms = elapsed if first_ms is None else first_ms
                if index >= WARMUP_REQUESTS:
                    latencies.append(elapsed)
                    size = len(body)
            cpu_ms = None
            if cpu_before is not None:
                cpu_after = cpu()
                cpu_ms = {part: (cpu_after[part] - cpu_before[part]) * 1000 / requests
                          for part in ("service", "postgres") if part in cpu_before and part in cpu_after}
            latencies.sort()
            figures[name] = {"path": path, "requests": len(latencies), "bytes": size, "first_ms": first_ms,
                             "cpu_ms_per_request": cpu_ms,
                             "p50_ms": _percentile(latencies, 0.50), "p95_ms": _percentile(latencies, 0.95),
                             "p99_ms": _percentile(latencies, 0.99), "max_ms": latencies[-1],
                             "mean_ms": statistics.fmean(latencies)}
            figures[name]["meets_target"] = figures[name]["p99_ms"] <= TARGET_P99_MS
    return figures


def render(figures: dict[str, dict], setup: dict) -> str:
    lines = [(f"analytics over HTTP: Rev-Acc with {setup['entries']:,} entries, its portfolio "
              f"{setup['portfolio_entries']:,} entries over {setup['weeks']} weeks; sequential requests, "
              f"target p99 <= {TARGET_P99_MS:g} ms; load average {setup.get('load_average_1m', '?')} "
              f"on {os.cpu_count()} cores"),
             f"{'route':<34} {'n':>5} {'first ms':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
             f"{'KiB':>6} {'CPU ms/req (service+pg)':>24}  target"]
    for name, row in figures.items():
        cpu = row.get("cpu_ms_per_request") or {}
        shown = (f"{cpu.get('service', 0):.1f} + {cpu.get('postgres', 0):.1f}" if cpu else "-")
        lines.append(f"{name:<34} {row['requests']:>5} {row['first_ms']:>8.1f} {row['p50_ms']:>8.1f} "
                     f"{row['p95_ms']:>8.1f} {row['p99_ms']:>8.1f} {row['max_ms']:>8.1f} {row['bytes'] / 1024:>6.1f} "
                     f"{shown:>24}  {'met' if row['meets_target'] else 'MISSED'}")
    return "\n".join(lines)


def write_json(figures: dict, setup: dict, args: argparse.Namespace, started: datetime) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"analytics-{started.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"started": started.isoformat(), "target_p99_ms": TARGET_P99_MS,
                                "arguments": vars(args), "setup": setup, "routes": figures,
                                "python": platform.python_version(), "machine": platform.machine()}, indent=2))
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--entries", type=int, default=10_000, help="trades on the measured Rev-Acc")
    parser.add_argument("--weeks", type=int, default=200, help="weeks of history (the portfolio's age)")
    parser.add_argument("--requests", type=int, default=200, help="measured requests per route")
    args = parser.parse_args(argv)
    if not 1 <= args.weeks <= 520 or args.entries < args.weeks or not 1 <= args.requests <= 100_000:
        parser.error("need 1 <= weeks <= 520, entries >= weeks and 1 <= requests <= 100000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    started = datetime.now(timezone.utc)

    def body() -> int:
        try:
            with Database() as database:
                url = database.create("analytics")
                progress(f"setup: {args.entries:,} trades over {args.weeks} weeks (in-process engine)")
                clock = time.perf_counter()
                setup = asyncio.run(asyncio.wait_for(populate(url, args.entries, args.weeks), SETUP_TIMEOUT_S))
                setup.update(weeks=args.weeks, seconds=round(time.perf_counter() - clock, 2))
                progress(f"setup done in {setup['seconds']:.1f} s: {setup['entries']:,} entries on the Rev-Acc")
                progress("starting the service (python -m gateway)")
                service = Service(url, database.tmp)
                with service:
                    paths = {"account": f"/v1/accounts/{setup['revenue']}/analytics",
                             "account ?weeks=13": f"/v1/accounts/{setup['revenue']}/analytics?weeks=13",
                             "portfolio": f"/v1/portfolios/{setup['portfolio']}/analytics",
                             "portfolio" + TRADED_SUFFIX: f"/v1/portfolios/{setup['portfolio']}/analytics"}
                    progress(f"measuring {args.requests} requests per route")
                    setup["load_average_1m"] = round(os.getloadavg()[0], 2)
                    try:
                        figures = asyncio.run(asyncio.wait_for(
                            measure(service.base, service.token, paths, args.requests, setup["revenue"],
                                    cpu=lambda: cpu_sample(own="bench", pids={"service": service.process.pid},
                                                           pgdata=database.pgdata)),
                            MEASURE_TIMEOUT_S))
                    except Exception:
                        progress("service log tail:\n" + service.log_tail())
                        raise
        except Exception as error:
            progress(f"failed: {type(error).__name__}: {error}")
            return 2
        print()
        print(render(figures, setup))
        path = write_json(figures, setup, args, started)
        print(f"\nresults: {shown_path(path)}")
        return 0 if all(row["meets_target"] for row in figures.values()) else 1

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
