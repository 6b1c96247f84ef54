"""The embedding API: `Engine` (async) and `BlockingEngine` (for threaded code).

The strategy engine starts one inside its own process; the HTTP gateway and the perf
harness use the very same object, so there is one path to the actors. The embedding API
runs as a trusted in-process principal: it does no token checks.

    async with Engine(settings) as engine:
        account = await engine.create_account(name="gen", type="generation", owner="ann")
        await engine.deposit(account.id, 100_00, idempotency_key="dep-1")

`Engine` is a facade: it starts and stops the engine and owns what every part shares
(settings, the store, the writer, the registry of account actors). Each public method is
one part's (`_Part` below), each part with one job:

- `dispatch` (`actors/dispatch.py`): admission, deadlines and idempotency keys, and the
  path of an operation to the account actors and back;
- `money` (`actors/money.py`): accounts and the money on them;
- `portfolios` (`actors/portfolios.py`): portfolios, fork, merge, reinvestment, projection;
- `queries` (`actors/queries.py`): reads of accounts, transactions, events, analytics;
- `admission` (`actors/admission.py`), `keys` (`actors/idempotency.py`), `supervision`
  (`actors/supervision.py`), `risk` (`actors/risk.py`), `security`, `webhooks`,
  `availability`: as their modules say.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
from datetime import datetime, timezone
from typing import Any, Callable

from engine.errors import NotFound, Unavailable
from engine.model import Account
from actors.account import AccountActor, AccountActorHooks, InjectFault, ReloadIfStale, Reply
from actors.admission import Admission
from actors.availability import Availability
from actors.context import mark_replayed
from actors.dispatch import Dispatch
from actors.idempotency import IdempotencyKeys
from actors.inputs import check_id
from actors.metrics import Metrics
from actors.money import Money
from actors.portfolios import Portfolios
from actors.queries import Queries
from actors.registry import Registry
from actors.risk import DrawdownFlags
from actors.runtime import ActorPool
from actors.security import Security
from actors.settings import Settings, load_settings
from actors.supervision import Supervision
from actors.supervisor import STANDALONE
from actors.webhooks import Webhooks
from persistence.embedded import EmbeddedServer
from persistence.store import Store
from persistence.writer import PurgeKeysOp, Writer

log = logging.getLogger("alluse.engine")

MAINTENANCE_INTERVAL_S = 1.0
# Supervisors of portfolios with nothing resident are swept every this many ticks (the
# sweep walks every resident account).
SUPERVISOR_SWEEP_TICKS = 10
# Expired idempotency keys are purged every this many ticks.
KEY_PURGE_TICKS = 60
# Idempotency keys committed lately (loaded at start, kept as they commit): a request
# with one of them is looked up before it is decided, so retries (after a lost reply or
# a restart) are answered without deciding again. Older keys are still caught by the
# key table's unique index at commit.
RECENT_KEYS_MAX = 100_000
SHUTDOWN_DRAIN_S = 10.0
DATABASE_START_WAIT_S = 30.0


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class _Part:
    """A public method of `Engine` that one of its parts implements: `engine.name` is
    `engine.<part>.name`, looked up once per engine (then an instance attribute, as cheap
    as a method of the engine's own)."""

    def __init__(self, part: str, cls: type):
        self.part = part
        self.cls = cls

    def __set_name__(self, owner, name: str) -> None:
        method = getattr(self.cls, name)   # a misspelt name fails at import
        self.name = name
        self.__doc__ = f"`{self.cls.__name__}.{name}` ({self.cls.__module__}): {method.__doc__ or ''}"

    def __get__(self, engine, owner=None):
        if engine is None:
            return self
        method = getattr(getattr(engine, self.part), self.name)
        engine.__dict__[self.name] = method
        return method


class Engine:
    # -- the public methods of the parts ---------------------------------------------
    # Accounts and money (`actors/money.py`).
    create_account = _Part("money", Money)
    update_account = _Part("money", Money)
    close_account = _Part("money", Money)
    deposit = _Part("money", Money)
    deposit_request = _Part("money", Money)
    withdraw = _Part("money", Money)
    withdraw_request = _Part("money", Money)
    book_trade = _Part("money", Money)
    book_trade_request = _Part("money", Money)
    transfer = _Part("money", Money)
    transfer_request = _Part("money", Money)
    # Portfolios and growth (`actors/portfolios.py`).
    create_portfolio = _Part("portfolios", Portfolios)
    portfolio_record = _Part("portfolios", Portfolios)
    get_portfolio = _Part("portfolios", Portfolios)
    portfolio_tree = _Part("portfolios", Portfolios)
    fork = _Part("portfolios", Portfolios)
    merge_portfolio = _Part("portfolios", Portfolios)
    reinvest_portfolio = _Part("portfolios", Portfolios)
    project = _Part("portfolios", Portfolios)
    # Reads (`actors/queries.py`).
    get_account = _Part("queries", Queries)
    list_accounts = _Part("queries", Queries)
    get_transaction = _Part("queries", Queries)
    list_transactions = _Part("queries", Queries)
    events_page = _Part("queries", Queries)
    events = _Part("queries", Queries)
    subscribe = _Part("queries", Queries)
    account_analytics = _Part("queries", Queries)
    portfolio_analytics = _Part("queries", Queries)
    drawdown_breaches = _Part("queries", Queries)

    def __init__(self, settings: Settings | None = None, *, clock: Callable[[], datetime] = _utc_now):
        self.settings = settings or load_settings()
        self.clock = clock
        self.metrics = Metrics()
        self.rules = self.settings.rules
        self.database_url: str | None = None
        self._embedded: EmbeddedServer | None = None
        self.store: Store | None = None
        self.writer: Writer | None = None
        self.registry: Registry | None = None
        self._pool: ActorPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Whether an operation is taken now, and how long its caller waits (`actors/admission.py`).
        self.admission = Admission(in_flight_max=self.settings.engine.operations_in_flight_max,
                                   timeout_s=self.settings.engine.operation_timeout_s)
        # Idempotency keys in flight and committed lately (`actors/idempotency.py`).
        self.keys = IdempotencyKeys(lookup=lambda key: self.store.idempotent_response(key), mark_replayed=mark_replayed,
                                    recent_max=RECENT_KEYS_MAX)
        # The path of an operation to the actors and back (`actors/dispatch.py`).
        self.dispatch = Dispatch(self)
        self._maintenance: asyncio.Task | None = None
        self._hooks: AccountActorHooks | None = None
        # The supervisor actors and what they decide (`actors/supervision.py`).
        self.supervision = Supervision(self)
        self._commit_signal: asyncio.Event | None = None
        self._background: set[asyncio.Task] = set()
        self._gc_threshold: tuple[int, ...] | None = None
        # The live drawdown_breach flags (`actors/risk.py`).
        self.risk = DrawdownFlags(self)
        # Portfolios, their growth and the portfolio cache (`actors/portfolios.py`).
        self.portfolios = Portfolios(self)
        # Accounts and money (`actors/money.py`); reads (`actors/queries.py`).
        self.money = Money(self)
        self.queries = Queries(self)
        # Tokens and the audit log (`engine.security.create_token(...)`, `.verify_audit()`).
        self.security = Security(self)
        # Webhook endpoints and their delivery (`engine.webhooks.create(url=...)`).
        self.webhooks = Webhooks(self)
        # The database's supervisor and the one-writer fence (issue 14).
        self.availability = Availability(self)

    @property
    def ready(self) -> bool:
        """Started and not stopping: operations are admitted."""
        return self.admission.open

    # -- lifecycle -------------------------------------------------------------------
    async def __aenter__(self) -> "Engine":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        database = self.settings.database
        url = database.url
        if not url:
            await self.availability.claim_data_directory()
            self._embedded = EmbeddedServer(database.data_dir, wal_archive_dir=database.wal_archive_dir,
                                            archive_timeout_s=database.archive_timeout_s)
            url = await asyncio.to_thread(self._embedded.start)
        self.database_url = url
        self.store = Store(url, pool_size=database.pool_size)
        await self._open_store()
        writer_connection = await self.availability.fence()
        applied = await self.store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        settings = self.settings.engine
        self._commit_signal = asyncio.Event()
        self.writer = Writer(self.store, batch_size_max=settings.batch_size_max, queue_max=settings.write_queue_max,
                             notify=self.dispatch.notify_resolved, metrics=self.metrics,
                             batch_wait_s=settings.batch_wait_ms / 1000, on_commit=self._signal_commit,
                             in_flight=lambda: self.admission.in_flight)
        self.availability.attach(self.writer, writer_connection)
        await self.writer.start()
        self._pool = ActorPool(self._loop, name="account")
        self.registry = Registry(load=self.store.load_account, spawn=self._spawn,
                                 resident_max=settings.resident_accounts_max, metrics=self.metrics)
        self.dispatch.attach(self._loop, self.registry, self.writer)
        self._hooks = AccountActorHooks(submit=self.writer.submit, is_poisoned=self.writer.poisoned.__contains__,
                                        self_tell=self.dispatch.tell_from_any_thread,
                                        on_failed=self.supervision.actor_failed, rules=self.rules)
        self.supervision.start()
        self.metrics.resident_actors.set_function(lambda: len(self.registry))
        self.metrics.operations_in_flight.set_function(lambda: self.admission.in_flight)
        self.metrics.write_queue_depth.set_function(lambda: self.writer.queue.qsize())
        await self.risk.load()
        self.keys.load(await self.store.recent_keys(RECENT_KEYS_MAX))
        await self.security.load()
        self.metrics.drawdown_breaches.set_function(lambda: len(self.risk.flags))
        self._maintenance = asyncio.create_task(self._maintain(), name="alluse-maintenance")
        self._tune_gc()
        self.admission.start(self._loop)
        await self.webhooks.start()
        self.availability.start()
        log.info("engine ready")

    def _tune_gc(self) -> None:
        """Everything alive after start (modules, settings, resident actors) is frozen out
        of the collector, and the young generation is collected every
        `gc_young_threshold` allocations instead of 700 (`engine.gc_young_threshold`)."""
        young = self.settings.engine.gc_young_threshold
        if not young:
            return
        self._gc_threshold = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(young, max(self._gc_threshold[1], 20), max(self._gc_threshold[2], 100))

    def _restore_gc(self) -> None:
        if self._gc_threshold is not None:
            gc.set_threshold(*self._gc_threshold)
            gc.unfreeze()
            self._gc_threshold = None

    async def _open_store(self) -> None:
        """A database that is still starting (or finishing crash recovery) refuses
        connections for a moment: retry for a bounded time before giving up."""
        deadline = self._loop.time() + DATABASE_START_WAIT_S
        while True:
            try:
                await self.store.open()
                return
            except Unavailable as error:
                if self._loop.time() >= deadline:
                    raise
                log.warning("database not reachable yet (%s); retrying", error.details.get("reason"))
                await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """Graceful: stop admitting, let operations in flight finish (bounded), flush the
        writer, stop the actors, close the database."""
        self.admission.open = False
        await self.availability.stop()
        await self.webhooks.stop()
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        deadline = self._loop.time() + SHUTDOWN_DRAIN_S if self._loop else 0
        while self.admission.in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.writer is not None:
            await self.writer.stop()
        for task in list(self._background):
            task.cancel()
        if self.registry is not None:
            self.registry.stop_all()
        self.supervision.stop()
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        if self.store is not None:
            await self.store.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None
        self._restore_gc()
        self.availability.release()

    async def _maintain(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            ticks += 1
            self.registry.passivate_idle(self.settings.engine.passivate_idle_s)
            if not self.writer.healthy and not self.writer.queue.qsize():
                await self.writer.ensure_connection()
            if self.writer.healthy:
                for account_id in list(self.writer.poisoned):
                    self.registry.tell(account_id, ReloadIfStale())
            if ticks % SUPERVISOR_SWEEP_TICKS == 0:
                self.supervision.passivate_idle()
            if ticks % KEY_PURGE_TICKS == 0 and self.writer.healthy:
                self._in_background(self.purge_expired_keys())
            if self.settings.engine.reinvest_schedule:
                self.portfolios.schedule_reinvestment(self.clock().date())

    async def purge_expired_keys(self) -> int:
        """Deletes idempotency keys past `engine.idempotency_key_retention_s` (through the
        writer, the only writer); returns how many. The maintenance task calls it every
        minute; a request with a purged key runs anew."""
        future = self._loop.create_future()
        self.writer.submit(PurgeKeysOp(self.settings.engine.idempotency_key_retention_s,
                                       Reply(self._loop, future).done_on_loop))
        count = await future
        if count:
            log.info("purged %d expired idempotency keys", count)
        return count

    async def check_ready(self) -> bool:
        """Readiness: recovery done and writes can commit, as the database's supervisor
        sees it (no query: it answers at once whatever the database does)."""
        return self.ready and self.availability.writable()

    # -- wiring ----------------------------------------------------------------------
    def _spawn(self, account: Account, restarted: bool = False):
        self.supervision.supervisor_of(account.portfolio_id or STANDALONE)
        return AccountActor.start(self._pool, account, self._hooks, restarted=restarted)

    def _signal_commit(self) -> None:
        """Wakes every event-feed reader: something committed."""
        signal, self._commit_signal = self._commit_signal, asyncio.Event()
        signal.set()

    def _in_background(self, coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task) -> None:
        """A background task's failure is logged, never left unobserved (issue 14)."""
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            log.warning("background task %s failed: %s", task.get_coro().__qualname__,
                        getattr(error, "message", None) or repr(error))

    # -- supervision and faults --------------------------------------------------------
    async def inject_fault(self, account_id: str) -> dict:
        """Tests only (`engine.fault_injection`): the account's actor fails on its next
        message. Refused as unknown when fault injection is off."""
        if not self.settings.engine.fault_injection:
            raise NotFound("fault injection is disabled", {})
        check_id(account_id)
        entry = await self.registry.acquire(account_id)
        try:
            self.registry.tell(account_id, InjectFault())
        finally:
            self.registry.release(entry)
        return {"account_id": account_id, "fault": "crash", "armed": True}

    def release_quarantine(self, account_id: str) -> None:
        """An operator's decision: let a quarantined account work again."""
        self.supervision.release(account_id)

    @property
    def supervisors(self) -> dict[str, Any]:
        """Supervisor id -> the supervisor actor's ref."""
        return self.supervision.supervisors

    async def supervisor_status(self) -> dict:
        """The supervision tree: each supervisor's accounts (running, passivated or
        quarantined), restarts and mailbox depths, and its resident child units."""
        from actors.status import supervisor_tree
        return await supervisor_tree(self)

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict:
        depths = self.registry.mailbox_depths()
        return {
            "ready": self.ready,
            "database_healthy": self.writer.healthy,
            "resident_accounts": len(self.registry),
            "resident_accounts_max": self.registry.resident_max,
            "operations_in_flight": self.admission.in_flight,
            "write_queue_depth": self.writer.queue.qsize(),
            "batches_committed": self.writer.batches,
            "operations_committed": self.writer.operations,
            "poisoned_accounts": sorted(self.writer.poisoned)[:100],
            "mailbox_depths": dict(sorted(depths.items(), key=lambda kv: -kv[1])[:20]),
        }


class BlockingEngine:
    """The same API for threaded code: an `Engine` on its own event loop in a background
    thread; every method blocks until the operation is durable (or refused).

        with BlockingEngine(settings) as engine:
            engine.deposit(account_id, 500)
    """

    def __init__(self, settings: Settings | None = None):
        self._engine = Engine(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="alluse-engine-loop", daemon=True)

    def __enter__(self) -> "BlockingEngine":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        self._call(self._engine.start())

    def stop(self) -> None:
        try:
            self._call(self._engine.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __getattr__(self, name: str):
        method = getattr(self._engine, name)
        if not asyncio.iscoroutinefunction(method):
            return method

        def blocking(*args, **kwargs):
            return self._call(method(*args, **kwargs))

        blocking.__name__ = name
        return blocking
