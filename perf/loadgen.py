"""The HTTP load generator: a separate process (spawned, so nothing is inherited), so
the client's CPU is not taken from the server's event loop. The parent starts it with a
spec and reads its messages through a pipe: one `{"result": ...}` per measured run (the
progress bar advances on each), then `{"done": ...}`, or `{"error": traceback}`.

Two tasks:
* `runs`: create and fund the accounts over HTTP, then drive every (workload, callers)
  of the spec, `repeats` times, each with its own set of keep-alive connections;
* `readers`: operators reading accounts and portfolios (GET) for one window that opens
  at the spec's `start_at`, while the parent process books the ALL-USE week.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import random
import resource
import traceback
from collections import Counter
from dataclasses import asdict
from typing import Iterator

from perf.common import DRAIN_TIMEOUT_S, SETUP_TIMEOUT_S, RunConfig, drive, event_loop_factory, progress, summarize
from perf.workloads import Workload

MESSAGE_SLACK_S = 60.0


async def _runs(spec: dict, send) -> dict:
    from perf.targets import HttpTarget

    target = HttpTarget(spec["base"], spec["token"], spec["server_pid"], spec["pgdata"])
    acknowledged: Counter[str] = Counter()
    try:
        await target.setup()
        send({"setup": len(target.accounts)})
        for _ in range(spec["repeats"]):
            for workload_fields, concurrency in spec["runs"]:
                workload = Workload(**workload_fields)
                config = RunConfig(concurrency=concurrency, **spec["window"])
                await target.open(concurrency)
                await target.prepare(workload)
                measurement = await drive(target.call(workload), workload.pick, config, target.snapshot)
                acknowledged[workload.operation] += measurement.acknowledged_total
                send({"result": asdict(summarize("http", workload.name, config, measurement))})
    finally:
        await target.close()
    return {"acknowledged": dict(acknowledged), "accounts": len(target.accounts)}


async def _readers(spec: dict, send) -> dict:
    """GET /v1/accounts/{id} and /v1/portfolios/{id}, alternately, chosen at random."""
    from perf.targets import HttpTarget

    target = HttpTarget(spec["base"], spec["token"], spec["server_pid"], spec["pgdata"])
    accounts, portfolios = spec["accounts"], spec["portfolios"]
    base = spec["base"]

    def pick(rng: random.Random) -> tuple:
        if rng.random() < 0.5:
            return (f"{base}/v1/accounts/{rng.choice(accounts)}",)
        return (f"{base}/v1/portfolios/{rng.choice(portfolios)}",)

    config = RunConfig(concurrency=spec["concurrency"], **spec["window"])
    try:
        await target.open(config.concurrency)
        call = target.call_requests(lambda url: ("GET", url, None))
        measurement = await drive(call, pick, config, target.snapshot, start_at=spec["start_at"])
        send({"result": asdict(summarize("http", spec["workload"], config, measurement))})
    finally:
        await target.close()
    return {}


async def _hello(spec: dict, send) -> dict:
    """GET /hello on the hello world (`perf.hello`) at each level, `repeats` times."""
    from perf.targets import HttpTarget
    from perf.workloads import HELLO

    target = HttpTarget(spec["base"], "-", spec["server_pid"], None)
    url = spec["base"] + "/hello"
    try:
        for _ in range(spec["repeats"]):
            for concurrency in spec["levels"]:
                config = RunConfig(concurrency=concurrency, **spec["window"])
                await target.open(concurrency)
                call = target.call_requests(lambda *_: ("GET", url, None))
                measurement = await drive(call, HELLO.pick, config, target.cpu_snapshot)
                send({"result": asdict(summarize("hello", HELLO.name, config, measurement))})
    finally:
        await target.close()
    return {}


def _main(spec: dict, connection) -> None:
    """Entry point of the load-generator process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:   # a socket per connection: 1,000 users need more than the usual 1,024
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        task = {"runs": _runs, "readers": _readers, "hello": _hello}[spec["task"]]
        with asyncio.Runner(loop_factory=event_loop_factory(spec["loop"])) as runner:
            connection.send({"done": runner.run(task(spec, connection.send))})
    except BaseException:  # noqa: BLE001 - reported to the parent
        connection.send({"error": traceback.format_exc()})
    finally:
        connection.close()


class LoadGenerator:
    """The parent's side: `with LoadGenerator(spec) as generator: for message in
    generator.messages(): ...`. Every wait is bounded; leaving the block stops the
    process if it is still running (interrupted, or it timed out)."""

    def __init__(self, spec: dict, log_tail=lambda: ""):
        self.spec = spec
        self.log_tail = log_tail
        self.done: dict | None = None
        window = spec["window"]
        self.run_budget_s = window["warmup_s"] + window["seconds"] + DRAIN_TIMEOUT_S + MESSAGE_SLACK_S

    def __enter__(self) -> "LoadGenerator":
        context = multiprocessing.get_context("spawn")
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_main, args=(self.spec, sender), name="alluse-bench-load", daemon=True)
        self.process.start()
        sender.close()
        return self

    def receive(self, budget_s: float) -> dict:
        try:
            if not self.receiver.poll(budget_s):
                raise RuntimeError(f"the load generator did not report within {budget_s:g} s")
            message = self.receiver.recv()
        except EOFError:
            raise RuntimeError(f"the load generator died (exit code {self.process.exitcode})") from None
        if "error" in message:
            raise RuntimeError(f"the load generator failed:\n{message['error']}\nservice log:\n{self.log_tail()}")
        return message

    def messages(self) -> Iterator[dict]:
        """Every message up to and including `done` (kept in `self.done`)."""
        budget = SETUP_TIMEOUT_S + self.run_budget_s
        while True:
            message = self.receive(budget)
            budget = self.run_budget_s
            if "done" in message:
                self.done = message["done"]
                return
            yield message

    def __exit__(self, *exc_info) -> None:
        if self.process.is_alive():
            self.process.join(5 if self.done is not None else 0)
        if self.process.is_alive():
            progress("stopping the load generator")
            self.process.terminate()
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.receiver.close()
