"""`python -m perf.webhooks [--seconds S] [--warmup S] [--rounds N] [--callers N]`

Webhook delivery under load (issue 11; part of `make bench`). One embedded Engine on a
fresh embedded PostgreSQL, 1,000 funded accounts, `--callers` (64) asyncio callers
posting uniform transfers in-process, in three situations:

* **none** - no webhook endpoint (the ledger's own pace);
* **down** - one endpoint whose receiver is down (a closed port of 127.0.0.1: every
  attempt is refused, its circuit opens, retries are scheduled);
* **live** - one endpoint with a live receiver in another process (an aiohttp server
  that answers 200 at once): first at a steady 100 transfers/s (a pace one endpoint keeps
  up with), then with the 64 callers: events delivered per second, and the delivery lag
  of each event (from the event's `created_at` to its arrival at the receiver), p50 and
  p99 (under the 64 callers the events come faster than one endpoint takes them one at a
  time, so the lag there is mostly the backlog).

`none` and `down` alternate `--rounds` times, so the difference between them can be
judged against the difference between two runs of the same situation (the noise of a
shared machine). Only acknowledged (committed) transfers count.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from datetime import datetime

from perf.common import (Database, RunConfig, add_window_arguments, drive, free_port, percentile, progress,
                         resolve_window, run_async, summarize)
from perf.workloads import WORKLOADS

PACED_PER_S = 100


def _receiver_main(connection) -> None:
    """The live receiver's process: answers 200 at once, notes (seq, lag, arrival)."""
    from aiohttp import web

    arrivals: list[tuple[int, float, float]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        event = json.loads(body)
        created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).timestamp()
        arrivals.append((event["seq"], now - created, now))
        return web.Response(status=200)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        connection.send(runner.addresses[0][1])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, connection.recv)   # "stop"
        connection.send(arrivals)
        await runner.cleanup()

    asyncio.run(serve())


class LiveReceiver:
    def __enter__(self) -> "LiveReceiver":
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_receiver_main, args=(child,), daemon=True)
        self.process.start()
        self.port = self.connection.recv()
        return self

    def arrivals(self) -> list[tuple[int, float, float]]:
        self.connection.send("stop")
        return self.connection.recv()

    def __exit__(self, *exc_info) -> None:
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()


async def measure(url: str, pgdata: str, config: RunConfig, rounds: int) -> dict:
    from actors.api import Engine
    from actors.settings import load_settings
    from perf.targets import EngineTarget

    settings = load_settings({}, {"database": {"url": url}, "engine": {"reinvest_schedule": False},
                                  "webhooks": {"allow_private_targets": True}})
    workload = WORKLOADS["transfers-uniform"]
    runs: dict[str, list[float]] = {"none": [], "down": []}
    # CPU (engine process + PostgreSQL) per acknowledged transfer: steadier than rates on
    # a shared machine.
    cpu_us: dict[str, list[float]] = {"none": [], "down": [], "live": []}
    async with Engine(settings) as engine:
        target = EngineTarget(engine, pgdata)
        await target.setup(portfolios=False)

        async def transfers(label: str, situation: str) -> float:
            measurement = await drive(target.call(workload), workload.pick, config, target.snapshot)
            result = summarize("webhooks", f"transfers ({label})", config, measurement)
            used = result.cpu_cores.get("engine", 0.0) + result.cpu_cores.get("postgres", 0.0)
            cpu_us[situation].append(round(used / result.per_second * 1e6, 1) if result.per_second else 0.0)
            progress(f"webhooks: {label}: {result.per_second:,.0f} transfers/s (p99 {result.p99_ms} ms, "
                     f"{cpu_us[situation][-1]} us CPU each)")
            return result.per_second

        for _ in range(rounds):
            runs["none"].append(await transfers("no endpoint", "none"))
            down = await engine.webhooks.create(url=f"http://127.0.0.1:{free_port()}/hook", description="down")
            runs["down"].append(await transfers("an endpoint that is down", "down"))
            await engine.webhooks.delete(down.id)
        with LiveReceiver() as receiver:
            live = await engine.webhooks.create(url=f"http://127.0.0.1:{receiver.port}/hook", description="live")
            paced_from = time.time()
            await paced_transfers(target.call(workload), workload, PACED_PER_S, config.seconds)
            paced_to = time.time()
            opened = time.time() + config.warmup_s
            per_second = await transfers("a live receiver", "live")
            closed = opened + config.seconds
            status = next(s for s in await engine.webhooks.status() if s["id"] == live.id)
            arrivals = receiver.arrivals()
    inside = sorted(lag for _seq, lag, at in arrivals if opened <= at < closed)
    paced = sorted(lag for _seq, lag, at in arrivals if paced_from <= at < paced_to)
    seqs = [seq for seq, _lag, _at in arrivals]
    return {"callers": config.concurrency, "seconds": config.seconds, "rounds": rounds,
            "transfers_per_s": {name: values for name, values in runs.items()}, "cpu_us_per_transfer": cpu_us,
            "live_transfers_per_s": per_second,
            "events_delivered_per_s": round(len(inside) / config.seconds, 1),
            "lag_p50_ms": _ms(percentile(inside, 0.5)), "lag_p99_ms": _ms(percentile(inside, 0.99)),
            "backlog_events_at_end": status["lag_events"], "paced_transfers_per_s": PACED_PER_S,
            "paced_lag_p50_ms": _ms(percentile(paced, 0.5)), "paced_lag_p99_ms": _ms(percentile(paced, 0.99)), "in_order": seqs == sorted(seqs),
            "duplicates": len(seqs) - len(set(seqs))}


async def paced_transfers(call, workload, per_second: int, seconds: float) -> None:
    """Transfers started at a steady `per_second` for `seconds` (a pace one endpoint keeps
    up with), then awaited."""
    import random

    rng, started, pending = random.Random(7), time.monotonic(), []
    for index in range(int(per_second * seconds)):
        await asyncio.sleep(max(0.0, started + index / per_second - time.monotonic()))
        pending.append(asyncio.ensure_future(call(*workload.pick(rng))))
    await asyncio.gather(*pending)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def render(figures: dict) -> str:
    none, down = figures["transfers_per_s"]["none"], figures["transfers_per_s"]["down"]
    spread = [abs(a - b) for a, b in zip(none, none[1:])] + [abs(a - b) for a, b in zip(down, down[1:])]
    lines = [
        f"webhooks: {figures['callers']} callers posting transfers in-process, {figures['seconds']:g} s windows",
        f"  transfers/s, no endpoint:            {', '.join(f'{v:,.0f}' for v in none)}"
        f" (median {statistics.median(none):,.0f})",
        f"  transfers/s, one endpoint down:      {', '.join(f'{v:,.0f}' for v in down)}"
        f" (median {statistics.median(down):,.0f})",
        f"  difference of the medians:           {statistics.median(down) - statistics.median(none):+,.0f}/s"
        + (f"; between runs of one situation up to {max(spread):,.0f}/s" if spread else ""),
        f"  CPU per transfer (engine+PostgreSQL): no endpoint {_list(figures['cpu_us_per_transfer']['none'])} us, "
        f"endpoint down {_list(figures['cpu_us_per_transfer']['down'])} us, "
        f"live receiver {_list(figures['cpu_us_per_transfer']['live'])} us",
        f"  with a live receiver:                {figures['live_transfers_per_s']:,.0f} transfers/s, "
        f"{figures['events_delivered_per_s']:,.0f} events delivered/s",
        f"  delivery lag (created -> received):  p50 {figures['lag_p50_ms']} ms, p99 {figures['lag_p99_ms']} ms; "
        f"backlog at the end {figures['backlog_events_at_end']:,} events; in order: {figures['in_order']}, "
        f"duplicates: {figures['duplicates']}",
        f"  at a steady {figures['paced_transfers_per_s']} transfers/s ({2 * figures['paced_transfers_per_s']} "
        f"events/s): lag p50 {figures['paced_lag_p50_ms']} ms, p99 {figures['paced_lag_p99_ms']} ms",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.webhooks", description=__doc__.split("\n\n")[1])
    add_window_arguments(parser, quick=(2.0, 1.0), full=(5.0, 1.0))
    parser.add_argument("--rounds", type=int, default=2, help="alternations of no endpoint / endpoint down")
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers posting transfers")
    args = parser.parse_args(argv)
    resolve_window(parser, args)
    if not 1 <= args.rounds <= 9 or not 1 <= args.callers <= 1000:
        parser.error("--rounds must be 1 to 9 and --callers 1 to 1000")
    config = RunConfig(concurrency=args.callers, warmup_s=args.warmup, seconds=args.seconds)
    with Database() as database:
        figures = run_async(measure(database.create("webhooks"), database.pgdata, config, args.rounds))
    print(render(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
