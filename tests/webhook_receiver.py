"""A real receiving endpoint for webhook tests: an aiohttp server on 127.0.0.1 that
answers as the test says (status, delay) and keeps every request it got, with its
headers, body and arrival time."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Callable

from aiohttp import web
from standardwebhooks.webhooks import Webhook


@dataclass
class Received:
    headers: dict
    body: bytes
    at: float
    status: int

    @property
    def message_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def event(self) -> dict:
        return json.loads(self.body)

    def verify(self, secret: str) -> dict:
        """Standard Webhooks verification from the receiver's side (raises if wrong)."""
        return Webhook(secret).verify(self.body, self.headers)


@dataclass
class Receiver:
    # (request number from 1) -> (status, seconds to wait before answering)
    behaviour: Callable[[int], tuple[int, float]] = lambda _n: (200, 0.0)
    requests: list[Received] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        app.router.add_post("/elsewhere", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status, delay = self.behaviour(len(self.requests) + 1)
        self.requests.append(Received(dict(request.headers), body, time.monotonic(), status))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text=f"answer {status}")

    def delivered(self) -> list[Received]:
        """The requests answered 2xx, in arrival order."""
        return [r for r in self.requests if 200 <= r.status < 300]

    def delivered_seqs(self) -> list[int]:
        return [r.event["seq"] for r in self.delivered()]
