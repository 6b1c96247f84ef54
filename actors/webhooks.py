"""Webhooks: the outbox's events delivered to registered HTTPS endpoints, signed the
Standard Webhooks way, at least once and in commit order per endpoint.

    created = await engine.webhooks.create(url="https://hooks.example.com/alluse")
    created.secret   # "whsec_..." - shown only here; verify with standardwebhooks

How it runs (all on the engine's event loop; nothing here ever blocks a commit or a reply):
- one *horizon* task follows the outbox's numbers (`Store.event_seqs_after`: the rows
  GET /v1/events would show, without their payloads) and keeps `horizon`: the highest
  sequence number below which every event is visible. A number that is missing (a
  transaction still committing, or one that rolled back) holds the horizon back for at
  most `gap_wait_s`, so an event that commits late is not passed over;
- one *worker* task per enabled endpoint reads that endpoint's feed (`events_page` with
  its owner, up to the horizon), and sends its events one at a time, in order, each
  until it succeeds or exhausts `retry_schedule_s` (then it becomes a dead letter and the
  worker goes on). At most `concurrency_max` requests are in flight over all endpoints;
- each endpoint has a circuit breaker (purgatory): `circuit_failures_max` failures in a
  row open it; the worker then holds that endpoint's events for `circuit_cooldown_s` and
  sends one trial (half-open), which closes it again or reopens it;
- the endpoint's cursor (the last event it is done with) and every attempt are written
  in small batches after the answers; after a crash delivery resumes after the cursor,
  so an event can arrive twice (with the same `webhook-id`), never not at all.

Management (create, update, delete, rotate, redeliver) is the admin's, and each change
commits only together with its audit record (see `_audited`)."""
from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import logging
import random
import secrets
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
from aiohttp.abc import AbstractResolver
from purgatory import AsyncCircuitBreakerFactory, AsyncInMemoryUnitOfWork
from purgatory.domain.model import OpenedState
from standardwebhooks.webhooks import Webhook

from engine import limits
from engine.audit import EMBEDDED, AuditContext
from engine.errors import EngineError, NotFound, Refused, ValidationFailed
from engine.webhooks import check_event_types, check_target, is_public_address, retry_delay_s, wants
from actors.ids import new_id
from actors.runtime import stop_tasks
from persistence.webhooks_store import WebhookStore
from actors.webhook_views import (
    Attempt, AttemptPage, CreatedWebhook, DeadLetter, DeadLetterPage, Redelivery, RotatedSecret, WebhookPage,
    WebhookView, view as _view,
)

if TYPE_CHECKING:
    from actors.api import Engine

log = logging.getLogger("alluse.webhooks")

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24
FEED_PAGE_SIZE = limits.PAGE_SIZE_MAX
REDELIVERIES_PER_ROUND = 50
PROGRESS_FLUSH_S = 0.1
IDLE_WAIT_S = 1.0
AHEAD_WAIT_S = 0.1
ERROR_PAUSE_S = 1.0
PRUNE_INTERVAL_S = 60.0
TRANSITIONS_KEPT = 20
USER_AGENT = "alluse-webhooks/1"
CIRCUIT_LEVEL = {"closed": 0, "half_open": 1, "open": 2}
encode_json = msgspec.json.Encoder().encode


def _safe_url(url: str) -> str:
    """For the audit log and logs: no query string or fragment (receivers sometimes put
    a token there)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


# -- delivery-time target check -------------------------------------------------------------
class RefusedTarget(OSError):
    """The host resolved to an address webhooks may not reach."""


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing any host that resolves to a private, loopback or
    link-local address (checked on the addresses actually connected to, so a name that
    changes its answer after the endpoint was registered is refused too)."""

    def __init__(self, allow_private: bool):
        self._inner = aiohttp.ThreadedResolver()
        self._allow_private = allow_private

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET):

        found = await self._inner.resolve(host, port, family)
        if not self._allow_private:
            for info in found:
                if not is_public_address(ipaddress.ip_address(info["host"])):
                    raise RefusedTarget(f"{host} resolves to a private address")
        return found

    async def close(self) -> None:
        await self._inner.close()


def _refused_target(error: BaseException) -> bool:
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, RefusedTarget) or isinstance(getattr(error, "os_error", None), RefusedTarget):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


# -- runtime state of one endpoint ----------------------------------------------------------
@dataclass(eq=False)
class Endpoint:
    row: dict
    cursor: int
    persisted_cursor: int
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    head_seq: int | None = None
    head_created_at: datetime | None = None
    head_failures: int = 0
    next_attempt_at: float | None = None
    last_outcome: str | None = None
    success_at: datetime | None = None
    transitions: collections.deque = field(default_factory=lambda: collections.deque(maxlen=TRANSITIONS_KEPT))
    signers: tuple = ()
    refusal: str | None = None
    breaker: Any = None

    @property
    def id(self) -> str:
        return self.row["id"]


@dataclass
class Result:
    outcome: str
    status: int | None = None
    latency_ms: float = 0.0
    excerpt: str | None = None
    error: str | None = None

    @property
    def delivered(self) -> bool:
        return self.outcome == "delivered"


class DeliveryFailed(Exception):
    """Raised inside the circuit breaker so that it counts the failure."""

    def __init__(self, result: Result):
        super().__init__(result.outcome)
        self.result = result


class Webhooks:
    """Endpoints, their delivery workers and their management, for one engine."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.settings = engine.settings.webhooks
        self.table: WebhookStore | None = None
        self.endpoints: dict[str, Endpoint] = {}
        self.horizon = 0
        self.latest_seq = 0
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._breakers: AsyncCircuitBreakerFactory | None = None
        self._circuits: dict = {}
        self._semaphore: asyncio.Semaphore | None = None
        self._changed: asyncio.Event | None = None
        self._attempts: list[tuple] = []
        self._dirty: asyncio.Event | None = None
        self._random = random.Random()
        self._running = False

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self.table = WebhookStore(self.engine.store)
        self._changed, self._dirty = asyncio.Event(), asyncio.Event()
        for row in await self.table.endpoints():
            self._remember(row)
        if not self.settings.deliver:
            return
        self._semaphore = asyncio.Semaphore(self.settings.concurrency_max)
        circuits = AsyncInMemoryUnitOfWork()
        self._circuits = circuits.contexts.breakers
        self._breakers = AsyncCircuitBreakerFactory(default_threshold=self.settings.circuit_failures_max,
                                                    default_ttl=self.settings.circuit_cooldown_s, uow=circuits)
        self._breakers.add_listener(self._circuit_changed)
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.settings.allow_private_targets),
                                         limit=self.settings.concurrency_max, ttl_dns_cache=60)
        # trust_env=False: no proxy from the environment ever sees a delivery.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                              headers={"User-Agent": USER_AGENT})
        enabled = [e.cursor for e in self.endpoints.values() if e.row["enabled"]]
        self.horizon = min(enabled) if enabled else await self._latest_event_seq()
        self._running = True
        self._tasks = [asyncio.create_task(self._track_horizon(), name="alluse-webhooks-horizon"),
                       asyncio.create_task(self._flush_progress_forever(), name="alluse-webhooks-progress")]
        for endpoint in self.endpoints.values():
            self._start_worker(endpoint)

    async def stop(self) -> None:
        self._running = False
        workers = [e.task for e in self.endpoints.values() if e.task is not None]
        if self._changed is not None:   # a loop that misses its cancellation sees `_running` now
            self._changed.set()
        await stop_tasks([*self._tasks, *workers], "webhook delivery", log)
        self._tasks = []
        for endpoint in self.endpoints.values():
            endpoint.task = None
        if self.table is not None and self.engine.store is not None and self.engine.store.pool is not None:
            try:
                await self.flush_progress()
            except EngineError as error:
                log.warning("could not save webhook progress at shutdown: %s", error.message)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _remember(self, row: dict) -> Endpoint:
        endpoint = self.endpoints.get(row["id"])
        if endpoint is None:
            endpoint = self.endpoints[row["id"]] = Endpoint(row=row, cursor=row["cursor"],
                                                            persisted_cursor=row["cursor"])
        else:
            endpoint.row = row
        endpoint.signers = self._signers(row)
        self.engine.metrics.webhook_dead_letters.labels(endpoint.id)
        # Judged once per URL (the settings do not change while running).
        try:
            check_target(row["url"], allow_private=self.settings.allow_private_targets)
            endpoint.refusal = None
        except ValidationFailed as refusal:
            endpoint.refusal = refusal.message
        return endpoint

    def _signers(self, row: dict) -> tuple:
        signers = [Webhook(row["secret"])]
        expires = row["previous_secret_expires_at"]
        if row["previous_secret"] and expires is not None:
            signers.append((Webhook(row["previous_secret"]), expires))
        return tuple(signers)

    def _start_worker(self, endpoint: Endpoint) -> None:
        if not self._running or not endpoint.row["enabled"] or endpoint.task is not None:
            return
        endpoint.task = asyncio.create_task(self._work(endpoint), name=f"alluse-webhook-{endpoint.id}")
        self._changed.set()

    def _stop_worker(self, endpoint: Endpoint) -> None:
        if endpoint.task is not None and endpoint.task is not asyncio.current_task():
            endpoint.task.cancel()
        endpoint.task = None

    async def _latest_event_seq(self) -> int:
        rows = await self.engine.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM events")
        return rows[0]["seq"]

    # -- the horizon -------------------------------------------------------------------
    async def _track_horizon(self) -> None:
        """Follows the whole outbox (through the feed) and moves `horizon` over every
        sequence number that is visible, or missing for longer than `gap_wait_s`."""
        loop = asyncio.get_running_loop()
        gap: tuple[int, float] | None = None
        last_prune = loop.time()
        while self._running:   # not only cancellation: 3.11's wait_for can swallow one
            try:
                active = [e for e in self.endpoints.values() if e.task is not None]
                if not active:
                    self._changed.clear()
                    await self._changed.wait()
                    continue
                self.horizon = max(self.horizon, min(e.cursor for e in active))
                if self.horizon - max(e.cursor for e in active) >= FEED_PAGE_SIZE:
                    # Every endpoint has a page or more to deliver (or waits for a retry):
                    # reading further ahead would only cost CPU. Note how far the outbox is.
                    self.latest_seq = max(self.latest_seq, await self._latest_event_seq())
                    self._publish(active)
                    await asyncio.sleep(AHEAD_WAIT_S)
                    continue
                signal = self.engine._commit_signal
                # The numbers only (the page's payloads are the workers' to read).
                page = await self.engine.store.event_seqs_after(self.horizon, FEED_PAGE_SIZE)
                gap = self._advance(page, gap, loop.time())
                self._publish(active)
                if len(page) == FEED_PAGE_SIZE and gap is None:
                    continue
                if loop.time() - last_prune > PRUNE_INTERVAL_S:
                    last_prune = loop.time()
                    await self._prune()
                try:
                    await asyncio.wait_for(signal.wait(), timeout=0.2 if gap else IDLE_WAIT_S)
                except asyncio.TimeoutError:
                    pass
                await asyncio.sleep(self.settings.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except EngineError as error:
                log.warning("webhooks cannot read the outbox: %s", error.message)
                await asyncio.sleep(ERROR_PAUSE_S)
            except Exception:  # noqa: BLE001 - a bug; keep delivering, the cause is in the log
                log.exception("webhook horizon error; continuing")
                await asyncio.sleep(ERROR_PAUSE_S)

    def _advance(self, page: list[int], gap: tuple[int, float] | None, now: float) -> tuple[int, float] | None:
        before = self.horizon
        for seq in page:
            self.latest_seq = max(self.latest_seq, seq)
            expected = self.horizon + 1
            if seq != expected:
                if gap is None or gap[0] != expected:
                    gap = (expected, now)
                if now - gap[1] < self.settings.gap_wait_s:
                    break
            gap = None
            self.horizon = seq
        if self.horizon != before:
            for endpoint in self.endpoints.values():
                endpoint.wake.set()
        return gap

    def _publish(self, active: list[Endpoint]) -> None:
        metrics, now = self.engine.metrics, datetime.now(timezone.utc)
        for endpoint in active:
            state = self.circuit_state(endpoint)
            metrics.webhook_lag_events.labels(endpoint.id).set(max(0, self.latest_seq - endpoint.cursor))
            metrics.webhook_lag_seconds.labels(endpoint.id).set(self._lag_seconds(endpoint, now))
            metrics.webhook_circuit_state.labels(endpoint.id).set(CIRCUIT_LEVEL[state])

    @staticmethod
    def _lag_seconds(endpoint: Endpoint, now: datetime) -> float:
        if endpoint.head_created_at is None:
            return 0.0
        return max(0.0, (now - endpoint.head_created_at).total_seconds())

    async def _prune(self) -> None:
        for endpoint_id in list(self.endpoints):
            await self.table.prune_attempts(endpoint_id, self.settings.attempts_kept_max)

    # -- one endpoint's worker -----------------------------------------------------------
    async def _work(self, endpoint: Endpoint) -> None:
        while self._running and endpoint.row["enabled"]:
            try:
                await self._redeliver(endpoint)
                endpoint.wake.clear()
                if not await self._deliver_page(endpoint):
                    try:
                        await asyncio.wait_for(endpoint.wake.wait(), timeout=IDLE_WAIT_S)
                    except asyncio.TimeoutError:
                        pass
            except asyncio.CancelledError:
                raise
            except EngineError as error:
                log.warning("webhook %s: %s", endpoint.id, error.message)
                await asyncio.sleep(ERROR_PAUSE_S)
            except Exception:  # noqa: BLE001 - a bug; keep delivering, the cause is in the log
                log.exception("webhook %s worker error; continuing", endpoint.id)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def _deliver_page(self, endpoint: Endpoint) -> bool:
        """Delivers the endpoint's events up to the horizon, one page; False if there was
        nothing to do."""
        horizon = self.horizon
        if endpoint.cursor >= horizon:
            return False
        page = await self.engine.events_page(after=endpoint.cursor, limit=FEED_PAGE_SIZE,
                                             owner=endpoint.row["owner"])
        for event in page:
            if event.seq > horizon or not endpoint.row["enabled"]:
                break
            if wants(endpoint.row["event_types"], event.type):
                if not await self._deliver(endpoint, event):
                    return True   # disabled (410): the event stays for when it is enabled again
            self._progress(endpoint, event.seq)
        else:
            if len(page) < FEED_PAGE_SIZE:
                self._progress(endpoint, horizon)   # nothing more of this endpoint's up to the horizon
        return True

    def _progress(self, endpoint: Endpoint, seq: int) -> None:
        if seq > endpoint.cursor:
            endpoint.cursor = seq
            self._dirty.set()
        endpoint.head_seq = endpoint.head_created_at = None

    async def _deliver(self, endpoint: Endpoint, event) -> bool:
        """Sends one event until it is delivered or dead-lettered (True), or the endpoint
        answered 410 and is now disabled (False)."""
        body = encode_json(event)
        message_id = f"evt_{event.seq}"
        endpoint.head_seq, endpoint.head_created_at, endpoint.head_failures = event.seq, event.created_at, 0
        while True:
            result = await self._attempt(endpoint, message_id, event.seq, body, endpoint.head_failures + 1)
            if result is None:
                continue
            if result.delivered:
                endpoint.success_at = datetime.now(timezone.utc)
                return True
            if result.outcome == "gone":
                await self._disable(endpoint, "the receiver answered 410 Gone")
                return False
            endpoint.head_failures += 1
            delay = retry_delay_s(self.settings.retry_schedule_s, endpoint.head_failures, self.settings.jitter_ratio,
                                  self._random.random())
            if delay is None:
                await self._dead_letter(endpoint, event, result)
                return True
            endpoint.next_attempt_at = time.time() + delay
            await self._pause(endpoint, delay)
            endpoint.next_attempt_at = None

    async def _pause(self, endpoint: Endpoint, delay_s: float) -> None:
        """Waits `delay_s`, or less if the endpoint is updated (a new URL is tried at once)."""
        endpoint.wake.clear()
        deadline = time.monotonic() + delay_s
        revision = endpoint.row["updated_at"]
        while time.monotonic() < deadline and endpoint.row["updated_at"] == revision:
            try:
                await asyncio.wait_for(endpoint.wake.wait(), timeout=deadline - time.monotonic())
            except asyncio.TimeoutError:
                return
            endpoint.wake.clear()

    async def _attempt(self, endpoint: Endpoint, message_id: str, seq: int, body: bytes,
                       attempt: int) -> Result | None:
        """One attempt through the endpoint's circuit breaker; None if the circuit is
        open (after waiting out its cool-down: the next attempt is the trial)."""
        if endpoint.breaker is None:
            endpoint.breaker = await self._breakers.get_breaker(endpoint.id)
        breaker = endpoint.breaker
        result: Result | None = None
        try:
            async with breaker:
                result = await self._post(endpoint, message_id, body)
                if not result.delivered and result.outcome != "gone":
                    raise DeliveryFailed(result)
        except OpenedState:
            context = breaker.context
            wait_s = max(0.01, (context.opened_at or time.time()) + context.ttl - time.time() + 0.01)
            await self._pause(endpoint, wait_s)
            return None
        except DeliveryFailed:
            pass
        endpoint.last_outcome = result.outcome
        metrics = self.engine.metrics
        metrics.webhook_deliveries.labels(result.outcome).inc()
        metrics.webhook_delivery_latency.observe(result.latency_ms / 1000)
        self._attempts.append((endpoint.id, seq, message_id, attempt, datetime.now(timezone.utc), result.outcome,
                               result.status, result.latency_ms, result.excerpt, result.error))
        self._dirty.set()
        return result

    def _headers(self, endpoint: Endpoint, message_id: str, body: bytes) -> dict:
        now = datetime.now(timezone.utc)
        text = body.decode()
        signatures = [endpoint.signers[0].sign(message_id, now, text)]
        for signer, expires_at in endpoint.signers[1:]:
            if now < expires_at:
                signatures.append(signer.sign(message_id, now, text))
        return {"webhook-id": message_id, "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": " ".join(signatures), "Content-Type": "application/json"}

    async def _post(self, endpoint: Endpoint, message_id: str, body: bytes) -> Result:
        url = endpoint.row["url"]
        if endpoint.refusal is not None:
            return Result("refused_target", error=endpoint.refusal)
        headers = self._headers(endpoint, message_id, body)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        async with self._semaphore:
            started = time.perf_counter()
            try:
                async with self._session.post(url, data=body, headers=headers, allow_redirects=False,
                                              timeout=timeout) as response:
                    raw = await response.content.read(self.settings.response_excerpt_bytes_max)
                    status = response.status
            except asyncio.TimeoutError:
                return Result("timeout", latency_ms=_ms(started), error=f"no answer in {self.settings.timeout_s} s")
            except aiohttp.ClientError as error:
                if _refused_target(error):
                    return Result("refused_target", latency_ms=_ms(started),
                                  error="the host resolves to a private address")
                return Result("connection_error", latency_ms=_ms(started), error=type(error).__name__)
            except OSError as error:
                outcome = "refused_target" if _refused_target(error) else "connection_error"
                return Result(outcome, latency_ms=_ms(started), error=type(error).__name__)
        excerpt = raw.decode("utf-8", "replace")
        outcome = "delivered" if 200 <= status < 300 else ("gone" if status == 410 else "http_error")
        return Result(outcome, status=status, latency_ms=_ms(started), excerpt=excerpt or None)

    async def _dead_letter(self, endpoint: Endpoint, event, result: Result) -> None:
        # Durable before the cursor passes the event: a crash cannot lose it.
        await self.table.dead_letter(endpoint.id, event_seq=event.seq, event_type=event.type,
                                     attempts=endpoint.head_failures, outcome=result.outcome,
                                     at=datetime.now(timezone.utc))
        self.engine.metrics.webhook_dead_letters.labels(endpoint.id).inc()
        log.warning("webhook %s: event %d is a dead letter after %d attempts (%s)", endpoint.id, event.seq,
                    endpoint.head_failures, result.outcome)

    async def _disable(self, endpoint: Endpoint, reason: str) -> None:
        now = datetime.now(timezone.utc)
        await self.flush_progress()
        await self.table.disable(endpoint.id, reason, now)
        endpoint.row = {**endpoint.row, "enabled": False, "disabled_reason": reason, "updated_at": now}
        endpoint.task = None
        log.warning("webhook %s disabled: %s", endpoint.id, reason)

    async def _redeliver(self, endpoint: Endpoint) -> None:
        """Dead letters an operator asked to redeliver: one attempt each; delivered ones
        are removed, the others are dead again (with one attempt more)."""
        for letter in await self.table.redelivering(endpoint.id, REDELIVERIES_PER_ROUND):
            seq = letter["event_seq"]
            page = await self.engine.events_page(after=seq - 1, limit=1, owner=endpoint.row["owner"])
            if not page or page[0].seq != seq:
                await self.table.delivered_dead_letter(endpoint.id, seq)   # the event is gone from the outbox
                continue
            result = None
            while result is None and endpoint.row["enabled"]:
                result = await self._attempt(endpoint, f"evt_{seq}", seq, encode_json(page[0]),
                                             letter["attempts"] + 1)
            if result is None:
                return
            if result.delivered:
                await self.table.delivered_dead_letter(endpoint.id, seq)
            elif result.outcome == "gone":
                await self._disable(endpoint, "the receiver answered 410 Gone")
                return
            else:
                await self.table.dead_letter(endpoint.id, event_seq=seq, event_type=letter["event_type"], attempts=1,
                                             outcome=result.outcome, at=datetime.now(timezone.utc))

    # -- progress: cursors and attempts, written in small batches ----------------------
    async def _flush_progress_forever(self) -> None:
        while True:
            await self._dirty.wait()
            await asyncio.sleep(PROGRESS_FLUSH_S)
            try:
                await self.flush_progress()
            except EngineError as error:
                log.warning("could not save webhook progress: %s", error.message)
                await asyncio.sleep(ERROR_PAUSE_S)

    async def flush_progress(self) -> None:
        """Writes the attempts recorded and the cursors advanced since the last flush."""
        self._dirty.clear()
        attempts, self._attempts = self._attempts, []
        moved = [(e, e.cursor, e.success_at) for e in self.endpoints.values() if e.cursor != e.persisted_cursor
                 or e.success_at is not None]
        if not attempts and not moved:
            return
        try:
            await self.table.save_progress(attempts, [(e.id, cursor, at) for e, cursor, at in moved])
        except BaseException:
            # Kept for the next flush (bounded: attempts of deleted endpoints go, and at
            # most `attempts_kept_max` wait).
            kept = [a for a in attempts + self._attempts if a[0] in self.endpoints]
            self._attempts = kept[-self.settings.attempts_kept_max:]
            self._dirty.set()
            raise
        for endpoint, cursor, at in moved:
            endpoint.persisted_cursor = cursor
            if endpoint.success_at is at:
                endpoint.success_at = None
            if at is not None:
                endpoint.row = {**endpoint.row, "last_success_at": at}

    # -- circuit state -----------------------------------------------------------------
    def _circuit_changed(self, name: str, kind: str, event: Any) -> None:
        endpoint = self.endpoints.get(name)
        if kind == "state_changed" and endpoint is not None:
            state = {"opened": "open", "half-opened": "half_open"}.get(event.state, event.state)
            endpoint.transitions.append({"state": state, "at": datetime.now(timezone.utc).isoformat()})
            log.info("webhook %s circuit %s", name, state)

    def circuit_state(self, endpoint: Endpoint) -> str:
        context = self._circuits.get(endpoint.id)
        if context is None:
            return "closed"
        return {"opened": "open", "half-opened": "half_open"}.get(context.state, context.state)

    # -- management (admin; audited) ---------------------------------------------------
    async def _audited(self, context: AuditContext | None, action: str, target: str, details: dict, change):
        """Runs `change(conn)` in a database transaction and commits it only once its
        audit record has committed (through the engine's writer, so the chain stays in
        commit order): the change is never in effect without its record. If the final
        commit failed after the record had committed, the record would stand for a change
        that did not happen - the safe side of the two."""
        async with self.table.transaction() as conn:
            result = await change(conn)
            await self.engine.security.record(context or AuditContext(EMBEDDED), action, target, "committed",
                                              details)
        return result

    def _owned(self, endpoint_id: Any, scope: str | None) -> Endpoint:
        endpoint = self.endpoints.get(endpoint_id) if isinstance(endpoint_id, str) else None
        if endpoint is None or (scope is not None and endpoint.row["owner"] != scope):
            raise NotFound("no such webhook", {"webhook_id": str(endpoint_id)[:limits.ID_LENGTH_MAX]})
        return endpoint

    async def create(self, *, url: str, event_types: list[str] | None = None, description: str | None = None,
                     owner: str | None = None, scope: str | None = None, context: AuditContext | None = None,
                     idempotency_key: str | None = None) -> CreatedWebhook:
        """A new endpoint, receiving the events committed from now on (only `owner`'s
        when set; a token scoped to an owner always makes its own). With an
        `idempotency_key`, a retry answers with the endpoint the first request made and
        makes no second one, but without its secret (`secret` is null; rotate it to get a
        new one): the key table keeps no secret, which would outlive a rotation or the
        endpoint itself."""
        from engine.webhooks import CreateWebhookRequest

        request = _convert(CreateWebhookRequest, url=url, event_types=event_types, description=description,
                           owner=owner)
        if idempotency_key is None:
            return await self._create(request, scope, context, None)
        return await self.engine.dispatch.keyed(
            idempotency_key, ("create_webhook", scope, request), CreatedWebhook,
            lambda claim: self._create(request, scope, context, claim))

    async def _create(self, request, scope: str | None, context: AuditContext | None, claim) -> CreatedWebhook:
        check_target(request.url, allow_private=self.settings.allow_private_targets)
        check_event_types(request.event_types)
        if len(self.endpoints) >= self.settings.endpoints_max:
            raise Refused("too many webhook endpoints", {"endpoints_max": self.settings.endpoints_max},
                          code="webhook_limit_reached")
        context = context or AuditContext(EMBEDDED)
        now = self.engine.clock()
        row = {"id": new_id("whk"), "url": request.url, "description": request.description,
               "event_types": list(request.event_types) if request.event_types is not None else None,
               "owner": scope if scope is not None else request.owner, "enabled": True, "disabled_reason": None,
               "secret": new_secret(), "previous_secret": None, "previous_secret_expires_at": None,
               "cursor": await self._latest_event_seq(), "last_success_at": None,
               "created_by": context.principal.token_id, "created_at": now, "updated_at": now}
        created = CreatedWebhook(**msgspec.structs.asdict(_view(row)), secret=row["secret"])

        async def insert(conn):
            if claim is not None:   # first: a key committed before makes nothing
                await self.table.insert_key(conn, claim.key, claim.fingerprint,
                                            msgspec.json.encode(msgspec.structs.replace(created, secret=None)))
            await self.table.insert_endpoint(conn, row)

        await self._audited(context, "create_webhook", row["id"],
                            {"url": _safe_url(row["url"]), "owner": row["owner"], "event_types": row["event_types"]},
                            insert)
        endpoint = self._remember(row)
        self._start_worker(endpoint)
        return created

    def list(self, *, scope: str | None = None) -> WebhookPage:
        rows = sorted((e.row for e in self.endpoints.values() if scope is None or e.row["owner"] == scope),
                      key=lambda r: (r["created_at"], r["id"]))
        return WebhookPage(items=[_view({**row, "cursor": self.endpoints[row["id"]].cursor}) for row in rows])

    def get(self, endpoint_id: str, *, scope: str | None = None) -> WebhookView:
        endpoint = self._owned(endpoint_id, scope)
        return _view({**endpoint.row, "cursor": endpoint.cursor})

    async def update(self, endpoint_id: str, *, url: str | None = None, event_types: list[str] | None = None,
                     description: str | None = None, enabled: bool | None = None, scope: str | None = None,
                     context: AuditContext | None = None) -> WebhookView:
        """Changes the URL, event types, description, or enables/disables; enabling
        resumes delivery after the cursor (where a 410 stopped it)."""
        from engine.webhooks import UpdateWebhookRequest

        request = _convert(UpdateWebhookRequest, url=url, event_types=event_types, description=description,
                           enabled=enabled)
        endpoint = self._owned(endpoint_id, scope)
        if request.url is not None:
            check_target(request.url, allow_private=self.settings.allow_private_targets)
        check_event_types(request.event_types)
        changes = {name: getattr(request, name) for name in ("url", "description", "event_types", "enabled")
                   if getattr(request, name) is not None}
        if "event_types" in changes:
            changes["event_types"] = list(changes["event_types"])
        if "enabled" in changes:
            changes["disabled_reason"] = None if changes["enabled"] else "disabled by an operator"
        row = {**endpoint.row, **changes, "updated_at": self.engine.clock()}

        async def change(conn):
            if await self.table.endpoint(endpoint.id, conn) is None:
                raise NotFound("no such webhook", {"webhook_id": endpoint.id})
            await self.table.update_endpoint(conn, row)

        details = {name: (_safe_url(value) if name == "url" else value) for name, value in changes.items()}
        await self._audited(context, "update_webhook", endpoint.id, details, change)
        endpoint = self._remember(row)
        endpoint.wake.set()
        if row["enabled"]:
            self._start_worker(endpoint)
        else:
            self._stop_worker(endpoint)
        return _view({**row, "cursor": endpoint.cursor})

    async def delete(self, endpoint_id: str, *, scope: str | None = None,
                     context: AuditContext | None = None) -> WebhookView:
        endpoint = self._owned(endpoint_id, scope)

        async def remove(conn):
            await self.table.delete_endpoint(conn, endpoint.id)

        await self._audited(context, "delete_webhook", endpoint.id, {"url": _safe_url(endpoint.row["url"])}, remove)
        self._stop_worker(endpoint)
        self.endpoints.pop(endpoint.id, None)
        for family in (self.engine.metrics.webhook_lag_events, self.engine.metrics.webhook_lag_seconds,
                       self.engine.metrics.webhook_circuit_state, self.engine.metrics.webhook_dead_letters):
            try:
                family.remove(endpoint.id)
            except KeyError:
                pass
        return _view({**endpoint.row, "cursor": endpoint.cursor})

    async def rotate_secret(self, endpoint_id: str, *, scope: str | None = None,
                            context: AuditContext | None = None) -> RotatedSecret:
        """A new signing secret (shown only here); the previous one keeps signing too,
        for `secret_grace_s`, so receivers can switch without missing a delivery."""
        endpoint = self._owned(endpoint_id, scope)
        now = self.engine.clock()
        secret, expires_at = new_secret(), now + timedelta(seconds=self.settings.secret_grace_s)
        previous = endpoint.row["secret"]

        async def rotate(conn):
            await self.table.rotate_secret(conn, endpoint.id, secret, previous, expires_at, now)

        await self._audited(context, "rotate_webhook_secret", endpoint.id, {"previous_secret_expires_at":
                                                                            expires_at.isoformat()}, rotate)
        self._remember({**endpoint.row, "secret": secret, "previous_secret": previous,
                        "previous_secret_expires_at": expires_at, "updated_at": now})
        return RotatedSecret(id=endpoint.id, secret=secret, previous_secret_expires_at=expires_at)

    async def attempts(self, endpoint_id: str, *, after: int = 0, limit: int = limits.PAGE_SIZE_DEFAULT,
                       scope: str | None = None) -> AttemptPage:
        endpoint = self._owned(endpoint_id, scope)
        _check_page(after, limit)
        await self.flush_progress()
        rows = await self.table.attempts(endpoint.id, after=after, limit=limit + 1)
        items = [_attempt(row) for row in rows[:limit]]
        return AttemptPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)

    async def latest_attempts(self, endpoint_id: str, *, limit: int = limits.PAGE_SIZE_DEFAULT,
                              scope: str | None = None) -> list[Attempt]:
        """The endpoint's latest attempts, newest first (the console's view of them)."""
        endpoint = self._owned(endpoint_id, scope)
        _check_page(0, limit)
        await self.flush_progress()
        return [_attempt(row) for row in await self.table.latest_attempts(endpoint.id, limit=limit)]

    async def dead_letters(self, endpoint_id: str, *, after: int = 0, limit: int = limits.PAGE_SIZE_DEFAULT,
                           scope: str | None = None) -> DeadLetterPage:
        endpoint = self._owned(endpoint_id, scope)
        _check_page(after, limit)
        rows = await self.table.dead_letters(endpoint.id, after=after, limit=limit + 1)
        items = [DeadLetter(**{name: row[name] for name in DeadLetter.__struct_fields__}) for row in rows[:limit]]
        return DeadLetterPage(items=items, next_cursor=str(items[-1].event_seq) if len(rows) > limit else None)

    async def redeliver(self, endpoint_id: str, event_seq: int | None = None, *, scope: str | None = None,
                        context: AuditContext | None = None) -> Redelivery:
        """Asks for another attempt of one dead letter (`event_seq`) or of all of them."""
        endpoint = self._owned(endpoint_id, scope)
        if event_seq is not None and (not isinstance(event_seq, int) or isinstance(event_seq, bool)
                                      or not 1 <= event_seq < 10**18):
            raise NotFound("no such dead letter", {"event_seq": str(event_seq)[:20]})

        async def mark(conn):
            count = await self.table.redeliver(conn, endpoint.id, event_seq)
            if event_seq is not None and count == 0:
                raise NotFound("no such dead letter", {"webhook_id": endpoint.id, "event_seq": event_seq})
            return count

        count = await self._audited(context, "redeliver_webhook", endpoint.id, {"event_seq": event_seq}, mark)
        endpoint.wake.set()
        return Redelivery(requeued=count)

    # -- status ------------------------------------------------------------------------
    async def status(self) -> list[dict]:
        """Per endpoint: enabled, circuit (and its recent transitions), lag in events
        and seconds, the event being retried, last success, dead letters."""
        counts = await self.table.dead_letter_counts() if self.table is not None else {}
        now = datetime.now(timezone.utc)
        shown = []
        for endpoint in sorted(self.endpoints.values(), key=lambda e: (e.row["created_at"], e.id)):
            row = endpoint.row
            shown.append({
                "id": endpoint.id, "url": _safe_url(row["url"]), "owner": row["owner"], "enabled": row["enabled"],
                "disabled_reason": row["disabled_reason"], "delivering": endpoint.task is not None,
                "circuit": self.circuit_state(endpoint), "circuit_transitions": list(endpoint.transitions),
                "cursor": endpoint.cursor, "horizon": self.horizon,
                "lag_events": max(0, self.latest_seq - endpoint.cursor),
                "lag_seconds": round(self._lag_seconds(endpoint, now), 3),
                "retrying_event": endpoint.head_seq if endpoint.head_failures else None,
                "failed_attempts": endpoint.head_failures,
                "next_attempt_at": (datetime.fromtimestamp(endpoint.next_attempt_at, timezone.utc).isoformat()
                                    if endpoint.next_attempt_at else None),
                "last_outcome": endpoint.last_outcome,
                "last_success_at": (endpoint.success_at or row["last_success_at"]),
                "dead_letters": counts.get(endpoint.id, 0)})
        return shown


def _attempt(row: dict) -> Attempt:
    return Attempt(**{name: row[name] for name in Attempt.__struct_fields__})


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _convert(request_type: type, **fields):
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, request_type, strict=True)
    except msgspec.ValidationError as error:
        field_name = str(error).split("`$.", 1)[1].split("`", 1)[0].split("[", 1)[0] if "`$." in str(error) else ""
        raise ValidationFailed(str(error), {"field": field_name, "reason": str(error)}) from None


def _check_page(after: Any, limit: Any) -> None:
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ValidationFailed("cursor must be a non-negative integer", {"field": "cursor"})
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
        raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
