"""The yardstick of the HTTP figures: an aiohttp hello world on the same box, in the same
run, driven by the same load generator (`python -m perf.hello --port P` serves it).

It answers `GET /hello` with a small JSON document and `GET /ready` with 200, on uvloop
with aiohttp's access log off, as the gateway runs. HTTP transfer figures are reported
as a share of it (`perf.report`): what a transfer costs beyond parsing a request and
writing a JSON reply."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from perf.common import HOST, ROOT, RunConfig, Service, Session, free_port, progress

HELLO_LEVELS = (64,)


def app():
    from aiohttp import web

    async def hello(_request):
        return web.json_response({"hello": "world"})

    async def ready(_request):
        return web.json_response({"status": "ready"})

    application = web.Application()
    application.router.add_get("/hello", hello)
    application.router.add_get("/ready", ready)
    return application


class HelloService(Service):
    """`python -m perf.hello` as a subprocess, started and stopped like the gateway."""

    def __init__(self, workdir):
        self.port = free_port()
        self.token = "-"
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = workdir / f"hello-{self.port}.log"
        self.process = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "perf.hello", "--port", str(self.port)], cwd=ROOT,
                                            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready()


def hello_session(database, window: RunConfig, repeats: int, bar, loop: str) -> Session:
    """The hello world at `HELLO_LEVELS` connections, `repeats` times."""
    from perf.common import Result
    from perf.loadgen import LoadGenerator

    results = []
    progress("hello: starting an aiohttp hello world (python -m perf.hello)")
    with HelloService(database.tmp) as service:
        spec = {"task": "hello", "base": service.base, "server_pid": service.process.pid, "loop": loop,
                "repeats": repeats, "levels": list(HELLO_LEVELS),
                "window": {"warmup_s": window.warmup_s, "seconds": window.seconds}}
        with LoadGenerator(spec, service.log_tail) as generator:
            for message in generator.messages():
                if "result" in message:
                    results.append(Result(**message["result"]))
                    bar.advance(f"hello world x{results[-1].concurrency}: {results[-1].per_second:,.0f}/s")
    return Session(results, {"ok": True, "problems": []})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvloop
    from aiohttp import web

    uvloop.install()
    web.run_app(app(), host=HOST, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
