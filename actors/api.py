"""The embedding API: `Engine` (async) and `BlockingEngine` (for threaded code).

The strategy engine starts one inside its own process; the HTTP gateway and the perf
harness use the very same object, so there is one path to the actors. The embedding API
runs as a trusted in-process principal: it does no token checks.

    async with Engine(settings) as engine:
        account = await engine.create_account(name="gen", type="generation", owner="ann")
        await engine.deposit(account.id, 100_00, idempotency_key="dep-1")
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import gc
import hashlib
import logging
import threading
import weakref
from datetime import date, datetime, timezone
from typing import Any, Awaitable, Callable, TypeVar

import msgspec

from engine import limits
from engine.errors import (
    EngineError, NotFound, Overloaded, Refused, Unavailable, ValidationFailed,
)
from engine.model import (
    Account, BookTrade, Close, Deposit, Fork, Growth, GrowthOperation, Portfolio, PortfolioOpened, Reinvest,
    Transaction, Transfer,
    TransferCredit, TransferDebit, UpdateAccount, Withdraw,
)
from engine.requests import (
    CreateAccountRequest, CreatePortfolioRequest, DepositRequest, ForkRequest, ProjectionRequest, ReinvestRequest,
    TradeRequest, TransferRequest, UpdateAccountRequest, WithdrawalRequest,
)
from engine import analytics, growth, ledger, projection, reports
from engine.rules import open_account, previous_quarter
from actors.account import (
    AccountActor, AccountActorHooks, Decided, InjectFault, Operation, Read, ReloadIfStale, Reply, Resolved,
    Step,
)
from actors.supervision import Supervision
from actors.supervisor import STANDALONE
from actors.admission import Admission
from actors.idempotency import IdempotencyKeys, KeyClaim
from actors.ids import new_id, next_op_id
from actors.metrics import Metrics
from actors.registry import Registry
from actors.risk import DrawdownFlags
from actors.runtime import ActorPool
from actors.settings import Settings, load_settings
from persistence.embedded import EmbeddedServer
from persistence.store import Store
from persistence.writer import AuditEntry, PurgeKeysOp, Writer, WriteOp
from engine.audit import EMBEDDED, SCHEDULER, AuditContext
from actors.security import Security
from actors.webhooks import Webhooks
from actors.availability import Availability

log = logging.getLogger("alluse.engine")
T = TypeVar("T")

MAINTENANCE_INTERVAL_S = 1.0
# Supervisors of portfolios with nothing resident are swept every this many ticks (the
# sweep walks every resident account).
SUPERVISOR_SWEEP_TICKS = 10
# Expired idempotency keys are purged every this many ticks.
KEY_PURGE_TICKS = 60
PORTFOLIO_CACHE_MAX = 100_000
# Idempotency keys committed lately (loaded at start, kept as they commit): a request
# with one of them is looked up before it is decided, so retries (after a lost reply or
# a restart) are answered without deciding again. Older keys are still caught by the
# key table's unique index at commit.
RECENT_KEYS_MAX = 100_000
NO_SKIP: frozenset[str] = frozenset()
REINVEST_SKIPS = frozenset({"already_reinvested", "account_not_active", "quarter_before_opening"})
SHUTDOWN_DRAIN_S = 10.0
DATABASE_START_WAIT_S = 30.0


# Who is acting (set by the gateway per request; in-process callers are the trusted
# embedded principal) and which operation runs, for the audit record of each commit.
AUDIT_CONTEXT: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar("alluse_audit", default=None)
OPERATION: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("alluse_operation",
                                                                                          default=None)


def audit_entry() -> AuditEntry:
    """The audit record of the operation running in this context."""
    context = AUDIT_CONTEXT.get() or AuditContext(EMBEDDED)
    action, target = OPERATION.get() or ("unknown", None)
    return AuditEntry(context=context, action=action, target=target)


_NO_OVERRIDE = contextlib.nullcontext()


def _override(reason: str | None):
    """Puts an admin override's reason on this call's audit context (nothing to do, and
    nearly free on the hot path, without one)."""
    return _NO_OVERRIDE if reason is None else _overriding(reason)


@contextlib.contextmanager
def _overriding(reason: str):
    context = AUDIT_CONTEXT.get()
    if context is None:
        reset = AUDIT_CONTEXT.set(AuditContext(EMBEDDED, reason=reason))
        try:
            yield
        finally:
            AUDIT_CONTEXT.reset(reset)
        return
    before, context.reason = context.reason, reason
    try:
        yield
    finally:
        context.reason = before


def _mark_replayed() -> None:
    """This call answers with an earlier call's result (same idempotency key)."""
    context = AUDIT_CONTEXT.get()
    if context is not None:
        context.replayed = True


class Page(msgspec.Struct, frozen=True, kw_only=True):
    items: list
    next_cursor: str | None = None


def _validate(request_type: type[T], **fields: Any) -> T:
    """Keyword arguments -> the same request Struct the gateway decodes, strictly."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, request_type, strict=True)
    except msgspec.ValidationError as error:
        raise ValidationFailed(str(error), {"reason": str(error)}) from error


def _fingerprint(operation: str, target: str | None, request: msgspec.Struct) -> str:
    body = msgspec.json.encode(request)
    return hashlib.sha256(b"%s|%s|%s" % (operation.encode(), (target or "").encode(), body)).hexdigest()


def _clean_text(value: Any, length_max: int) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= length_max and "\x00" not in value


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Engine:
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
        self.keys = IdempotencyKeys(lookup=lambda key: self.store.idempotent_response(key), mark_replayed=_mark_replayed,
                                    recent_max=RECENT_KEYS_MAX)
        self._maintenance: asyncio.Task | None = None
        self._hooks: AccountActorHooks | None = None
        # The supervisor actors and what they decide (`actors/supervision.py`).
        self.supervision = Supervision(self)
        # One merge at a time per unit; a lock lives while someone holds or awaits it.
        self._merge_locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._commit_signal: asyncio.Event | None = None
        self._background: set[asyncio.Task] = set()
        self._scheduled_quarter: str | None = None
        self._gc_threshold: tuple[int, ...] | None = None
        self._portfolios: collections.OrderedDict[str, Portfolio] = collections.OrderedDict()
        # The live drawdown_breach flags (`actors/risk.py`).
        self.risk = DrawdownFlags(self)
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
                             notify=self._notify_resolved, metrics=self.metrics,
                             batch_wait_s=settings.batch_wait_ms / 1000, on_commit=self._signal_commit,
                             in_flight=lambda: self.admission.in_flight)
        self.availability.attach(self.writer, writer_connection)
        await self.writer.start()
        self._pool = ActorPool(self._loop, name="account")
        self.registry = Registry(load=self.store.load_account, spawn=self._spawn,
                                 resident_max=settings.resident_accounts_max, metrics=self.metrics)
        self._hooks = AccountActorHooks(submit=self.writer.submit, is_poisoned=self.writer.poisoned.__contains__,
                                        self_tell=self._tell_from_any_thread,
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
                quarter = previous_quarter(self.clock().date())
                if quarter != self._scheduled_quarter:
                    self._scheduled_quarter = quarter
                    self._in_background(self._reinvest_everything(quarter))

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

    def _notify_resolved(self, resolutions) -> None:
        """After a batch, before its callers hear: each touched actor learns what
        committed (an idle one at once)."""
        registry = self.registry
        resident = registry.resident
        for account_id, resolution in resolutions.items():
            entry = resident.get(account_id)
            if entry is not None:
                actor = entry.actor
                if not actor.deliver_now(Resolved(resolution), actor.on_resolved):
                    registry.forget(account_id, entry.ref)

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

    def _tell_from_any_thread(self, account_id: str, message: Any) -> None:
        if asyncio._get_running_loop() is self._loop:
            self._loop.call_soon(self.registry.tell, account_id, message)
        else:
            self._loop.call_soon_threadsafe(self.registry.tell, account_id, message)

    # -- admission, idempotency, timeouts --------------------------------------------
    async def _idempotent(self, key: str | None, request: tuple[str, str | None, msgspec.Struct],
                          result_type: type[T], run: Callable[[KeyClaim | None], Awaitable[T]]) -> T:
        """Admits the operation and runs `run` within the operation timeout, at most once
        per key (`actors/idempotency.py`): a retry while the first is in flight waits for
        its outcome; a retry after it committed gets the stored result (also after a
        restart); the same key with another request (operation, target, body) is refused."""
        if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= limits.IDEMPOTENCY_KEY_LENGTH_MAX):
            raise ValidationFailed("the idempotency key must be 1 to 200 characters", {"field": "Idempotency-Key"})
        admission = self.admission
        admission.admit()
        # `admission.bounded`, inline: one coroutine less per operation.
        deadline = admission.deadline()
        try:
            reset = OPERATION.set((request[0], request[1] or getattr(request[2], "from_account", None)))
            admission.in_flight += 1
            try:
                if key is None:
                    return await run(None)
                return await self.keys.run(key, _fingerprint(*request), result_type, run)
            finally:
                admission.in_flight -= 1
                OPERATION.reset(reset)
        except asyncio.CancelledError:
            admission.missed(deadline)
            raise
        finally:
            admission.done(deadline)

    async def _on_account(self, account_id: str, command, render, idempotency, *, transaction_id=None,
                          correlation_id=None):
        """One command to one account's actor (leased for the duration); waits for the
        answer the writer (after COMMIT) or the actor (a refusal) gives."""
        return await self._run_steps([(account_id, command, NO_SKIP)], render, idempotency,
                                     correlation_id=correlation_id, transaction_id=transaction_id)

    def _check_account_load(self, entry) -> None:
        if entry.leases > self.settings.engine.account_operations_in_flight_max:
            raise Overloaded("too many operations in flight on this account", {"account_id": entry.account_id})

    async def _run_steps(self, steps: list[tuple[str, Any, frozenset[str]]], render, idempotency, *,
                         correlation_id: str | None, transaction_id: str | None = None, outbox=None,
                         now: datetime | None = None):
        """An operation on one or more accounts: `steps` are (account id, command or
        function of the events so far, refusal codes that skip the step). Every account
        is leased (and activated) first; the first account's actor then decides every
        part in one message and submits one write."""
        entries = []
        try:
            registry = self.registry
            for account_id, _, _ in steps:
                entries.append(registry.acquire_resident(account_id) or await registry.acquire(account_id))
            # An operation is bounded where it enters: at its first account.
            self._check_account_load(entries[0])
            future = self._loop.create_future()
            operation = Operation(
                op_id=next_op_id(), reply=Reply(self._loop, future, idempotency), now=now or self.clock(),
                render=render,
                correlation_id=correlation_id, idempotency=idempotency, audit=audit_entry(), outbox=outbox,
                steps=[Step(account_id=account_id, actor=entry.actor,
                            transaction_id=transaction_id if transaction_id and len(steps) == 1 else new_id("txn"),
                            command=command, skip_codes=skip)
                       for (account_id, command, skip), entry in zip(steps, entries)])
            if not entries[0].actor.deliver(operation):
                registry.forget(steps[0][0], entries[0].ref)
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await future
        finally:
            for entry in entries:
                self.registry.release(entry)

    # -- accounts --------------------------------------------------------------------
    async def create_account(self, *, name: str, type: str, owner: str, opened_on: date | None = None,
                             idempotency_key: str | None = None) -> Account:
        request = _validate(CreateAccountRequest, name=name, type=type, owner=owner, opened_on=opened_on)

        async def run(idempotency):
            account = open_account(account_id=new_id("acc"), name=request.name, account_type=request.type,
                                   owner=request.owner, opened_on=request.opened_on, now=self.clock())
            rows = ledger.Rows()
            ledger.open_account(rows, account)
            return await self._write(rows, account, idempotency)

        return await self._idempotent(idempotency_key, ("create_account", None, request), Account, run)

    async def _write(self, rows: "ledger.Rows", result, idempotency) -> Any:
        """An operation decided here rather than by an actor (it opens accounts that have
        none yet): straight to the writer."""
        future = self._loop.create_future()
        self.writer.enqueue(WriteOp(op_id=next_op_id(), accounts=(), rows=rows, result=result,
                                    idempotency=idempotency, done=Reply(self._loop, future, idempotency).done_on_loop,
                                    audit=audit_entry()))
        return await future

    async def get_account(self, account_id: str) -> Account:
        """The committed state, from the resident actor (reads keep working while the
        database is down) or activated from the database."""
        self._check_id(account_id)
        self.admission.admit()
        entry = await self.registry.acquire(account_id)
        try:
            future = self._loop.create_future()
            if not self.registry.tell(account_id, Read(Reply(self._loop, future))):
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await self.admission.bounded(future)
        finally:
            self.registry.release(entry)

    async def list_accounts(self, *, limit: int = limits.PAGE_SIZE_DEFAULT, cursor: str | None = None,
                            type: str | None = None, status: str | None = None, owner: str | None = None,
                            portfolio_id: str | None = None) -> Page:
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
            raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
        if type is not None and type not in ("generation", "revenue", "compounding"):
            raise ValidationFailed("unknown account type", {"field": "type"})
        if status is not None and status not in ("active", "frozen", "closed", "merged"):
            raise ValidationFailed("unknown account status", {"field": "status"})
        for name, value, length_max in (("cursor", cursor, limits.ID_LENGTH_MAX),
                                        ("owner", owner, limits.OWNER_LENGTH_MAX),
                                        ("portfolio_id", portfolio_id, limits.ID_LENGTH_MAX)):
            if value is not None and not _clean_text(value, length_max):
                raise ValidationFailed(f"malformed {name}", {"field": name})
        items = await self.store.list_accounts(limit=limit + 1, after_id=cursor, type=type, status=status,
                                               owner=owner, portfolio_id=portfolio_id)
        next_cursor = items[limit - 1].id if len(items) > limit else None
        return Page(items=items[:limit], next_cursor=next_cursor)

    async def update_account(self, account_id: str, *, name: str | None = None, status: str | None = None,
                             idempotency_key: str | None = None) -> Account:
        request = _validate(UpdateAccountRequest, name=name, status=status)
        self._check_id(account_id)

        async def run(idempotency):
            command = UpdateAccount(name=request.name, status=request.status)
            return await self._on_account(account_id, command, _render_account(account_id), idempotency)

        return await self._idempotent(idempotency_key, ("update_account", account_id, request),
                                      Account, run)

    async def close_account(self, account_id: str, *, idempotency_key: str | None = None) -> Account:
        self._check_id(account_id)
        return await self._idempotent(
            idempotency_key, ("close_account", account_id, Close()), Account,
            lambda idempotency: self._on_account(account_id, Close(), _render_account(account_id), idempotency))

    # -- money -----------------------------------------------------------------------
    # Each operation has two doors: keyword arguments, validated here, and `*_request`
    # with the request Struct the gateway has already decoded and validated (decoded once).
    async def deposit(self, account_id: str, amount: int, *, memo: str | None = None,
                      idempotency_key: str | None = None) -> Transaction:
        return await self.deposit_request(account_id, _validate(DepositRequest, amount=amount, memo=memo),
                                          idempotency_key=idempotency_key)

    async def deposit_request(self, account_id: str, request: DepositRequest, *,
                              idempotency_key: str | None = None) -> Transaction:
        return await self._single_leg("deposit", account_id, request, Deposit(amount=request.amount, memo=request.memo),
                                      idempotency_key)

    async def withdraw(self, account_id: str, amount: int, *, memo: str | None = None,
                       override_reason: str | None = None, idempotency_key: str | None = None) -> Transaction:
        """`override_reason` (admins only over HTTP) withdraws even from an account type
        that refuses withdrawals; the reason is audited."""
        return await self.withdraw_request(
            account_id, _validate(WithdrawalRequest, amount=amount, memo=memo, override_reason=override_reason),
            idempotency_key=idempotency_key)

    async def withdraw_request(self, account_id: str, request: WithdrawalRequest, *,
                               idempotency_key: str | None = None) -> Transaction:
        with _override(request.override_reason):
            return await self._single_leg("withdraw", account_id, request,
                                          Withdraw(amount=request.amount, memo=request.memo,
                                                   override=request.override_reason is not None), idempotency_key)

    async def book_trade(self, account_id: str, *, kind: str, amount: int, effective_date: date | None = None,
                         memo: str | None = None, idempotency_key: str | None = None) -> Transaction:
        return await self.book_trade_request(
            account_id, _validate(TradeRequest, kind=kind, amount=amount, effective_date=effective_date, memo=memo),
            idempotency_key=idempotency_key)

    async def book_trade_request(self, account_id: str, request: TradeRequest, *,
                                 idempotency_key: str | None = None) -> Transaction:
        command = BookTrade(kind=request.kind, amount=request.amount, memo=request.memo,
                            effective_date=request.effective_date)
        result = await self._single_leg("trade", account_id, request, command, idempotency_key)
        self.risk.after_trade(account_id, request.kind)
        return result

    async def _single_leg(self, operation: str, account_id: str, request, command, idempotency_key) -> Transaction:
        self._check_id(account_id)

        async def run(idempotency):
            result = await self._on_account(account_id, command, _render_first_leg, idempotency)
            unit = self._merge_due(account_id) if result.direction == "credit" else None
            return result if unit is None else _with_merge(result, await self._after_credit(unit))

        return await self._idempotent(idempotency_key, (operation, account_id, request), Transaction, run)

    async def transfer(self, from_account: str, to_account: str, amount: int, *, memo: str | None = None,
                       override_reason: str | None = None, idempotency_key: str | None = None) -> Transfer:
        """Both legs commit in one database transaction or neither does. `override_reason`
        as for `withdraw`."""
        request = _validate(TransferRequest, from_account=from_account, to_account=to_account, amount=amount,
                            memo=memo, override_reason=override_reason)
        if override_reason is None:   # one coroutine less on the hot path
            return await self._transfer(request, idempotency_key)
        return await self.transfer_request(request, idempotency_key=idempotency_key)

    async def transfer_request(self, request: TransferRequest, *, idempotency_key: str | None = None) -> Transfer:
        with _override(request.override_reason):
            return await self._transfer(request, idempotency_key)

    async def _transfer(self, request: TransferRequest, idempotency_key: str | None) -> Transfer:
        if request.from_account == request.to_account:
            raise ValidationFailed("from_account and to_account must differ", {"field": "to_account"})

        async def run(idempotency):
            transfer_id = new_id("xfr")
            now = self.clock()

            def render(decided: Decided) -> Transfer:
                return Transfer(id=transfer_id, kind="transfer", from_account=request.from_account,
                                to_account=request.to_account, amount=request.amount, memo=request.memo,
                                created_at=now, legs=decided.transactions, growth=_fork_of(decided))

            steps = [(request.from_account,
                      TransferDebit(to_account=request.to_account, amount=request.amount, memo=request.memo,
                                    override=request.override_reason is not None), NO_SKIP),
                     (request.to_account,
                      TransferCredit(from_account=request.from_account, amount=request.amount, memo=request.memo),
                      NO_SKIP)]
            result = await self._run_steps(steps, render, idempotency, correlation_id=transfer_id,
                                           outbox=ledger.transfer_events, now=now)
            unit = self._merge_due(request.to_account)
            return result if unit is None else _with_merge(result, await self._after_credit(unit))

        return await self._idempotent(idempotency_key, ("transfer", None, request), Transfer, run)

    # -- portfolios and growth --------------------------------------------------------
    async def create_portfolio(self, *, name: str, owner: str, initial_capital: int, opened_on: date | None = None,
                               idempotency_key: str | None = None) -> reports.PortfolioView:
        """A root portfolio: its capital split 40/30/30 (remainder of rounding to the
        Com-Acc) into Gen-Acc, Rev-Acc and Com-Acc, all in one commit."""
        request = _validate(CreatePortfolioRequest, name=name, owner=owner, initial_capital=initial_capital,
                            opened_on=opened_on)

        async def run(idempotency):
            events = growth.open_portfolio(name=request.name, owner=request.owner, capital=request.initial_capital,
                                           now=self.clock(), new_id=new_id, opened_on=request.opened_on,
                                           rules=self.rules)
            rows = ledger.Rows()
            ledger.apply_events(rows, events)
            view = reports.portfolio_view(events[0].portfolio, rows.states, [], {}, self.rules)
            ledger.describe_opening(rows, view)
            return await self._write(rows, view, idempotency)

        return await self._idempotent(idempotency_key, ("create_portfolio", None, request),
                                      reports.PortfolioView, run)

    async def _portfolio(self, portfolio_id: str) -> Portfolio:
        """A portfolio row, from a bounded cache: rows change only when this engine merges
        a unit (the only writer), and a merge evicts the unit's row."""
        self._check_id(portfolio_id)
        portfolio = self._portfolios.get(portfolio_id)
        if portfolio is not None:
            self._portfolios.move_to_end(portfolio_id)
            return portfolio
        portfolio = await self.store.load_portfolio(portfolio_id)
        if portfolio is None:
            raise NotFound("no such portfolio", {"portfolio_id": portfolio_id})
        self._portfolios[portfolio_id] = portfolio
        while len(self._portfolios) > PORTFOLIO_CACHE_MAX:
            self._portfolios.popitem(last=False)
        return portfolio

    async def portfolio_record(self, portfolio_id: str) -> Portfolio:
        """The portfolio's own row (its owner, parent, accounts), from the cache."""
        return await self._portfolio(portfolio_id)

    async def get_portfolio(self, portfolio_id: str) -> reports.PortfolioView:
        """The portfolio's accounts, its direct units and totals (committed state)."""
        portfolio = await self._portfolio(portfolio_id)
        tree = await self.store.portfolio_tree(portfolio_id, depth_max=1, nodes_max=self.settings.engine.tree_nodes_max)
        units = tree[1:]
        ids = list(portfolio.account_ids) + [i for unit in units for i in unit.account_ids]
        accounts = await self.store.load_accounts(ids)
        return reports.portfolio_view(portfolio, accounts, units, accounts, self.rules)

    async def portfolio_tree(self, portfolio_id: str) -> reports.PortfolioTree:
        """The whole fork tree below a portfolio (breadth first, bounded)."""
        await self._portfolio(portfolio_id)
        nodes_max = self.settings.engine.tree_nodes_max
        portfolios = await self.store.portfolio_tree(portfolio_id, depth_max=self.rules.portfolio_depth_max + 1,
                                                     nodes_max=nodes_max + 1)
        truncated = len(portfolios) > nodes_max
        portfolios = portfolios[:nodes_max]
        accounts = await self.store.load_accounts([i for p in portfolios for i in p.account_ids])
        return reports.portfolio_tree(portfolio_id, portfolios, accounts, truncated, self.rules)

    async def fork(self, account_id: str, *, amount: int | None = None,
                   idempotency_key: str | None = None) -> GrowthOperation:
        """A manual fork of a portfolio's Gen-Acc: `amount` (default: the whole surplus
        over its baseline) leaves for a new unit, half to its Gen-Acc, the rest to its
        Com-Acc, in one commit."""
        request = _validate(ForkRequest, amount=amount)
        self._check_id(account_id)
        return await self._idempotent(
            idempotency_key, ("fork", account_id, request), GrowthOperation,
            lambda idempotency: self._on_account(account_id, Fork(amount=request.amount), _render_fork, idempotency))

    async def merge_portfolio(self, portfolio_id: str, *, idempotency_key: str | None = None) -> GrowthOperation:
        """Merges a forked unit now: all its money to the root's Com-Acc in one commit;
        its accounts become `merged`. Units below it stay where they are."""
        self._check_id(portfolio_id)
        return await self._idempotent(
            idempotency_key, ("merge", portfolio_id, ForkRequest()), GrowthOperation,
            lambda idempotency: self._merge(portfolio_id, idempotency, force=True))

    def _merge_due(self, account_id: str) -> str | None:
        """The forked unit a credit to `account_id` may have to merge (None: no merge
        check is needed, the common case, decided without a coroutine). The account's
        last committed state says: a unit's accounts never leave their unit."""
        entry = self.registry.resident.get(account_id)
        if entry is None or entry.actor.committed.portfolio_depth == 0:
            return None
        return entry.actor.committed.portfolio_id

    async def _after_credit(self, portfolio_id: str) -> GrowthOperation | None:
        """The merge check that follows every credit to an account of a forked unit
        (`_merge_due`); it completes before the credit is answered, so a caller sees the
        merge it caused (returned, for the credit's reply)."""
        reset = OPERATION.set(("merge.automatic", portfolio_id))
        try:
            return await self._merge(portfolio_id, None, force=False)
        except EngineError as error:
            log.warning("merge check of %s after a credit failed: %s", portfolio_id, error.message)
            return None
        finally:
            OPERATION.reset(reset)

    async def _merge(self, portfolio_id: str, idempotency, *, force: bool) -> GrowthOperation | None:
        lock = self._merge_locks.get(portfolio_id)
        if lock is None:
            lock = self._merge_locks[portfolio_id] = asyncio.Lock()
        async with lock:
            unit = await self._portfolio(portfolio_id)
            if not unit.is_unit or unit.status != "active":
                if force:
                    raise Refused("only an active forked unit can merge",
                                  {"portfolio_id": portfolio_id, "status": unit.status}, code="merge_not_allowed")
                return None
            if not force:
                balances = [(await self.get_account(i)).balance for i in unit.account_ids]
                if not growth.merge_due(unit, balances, self.rules):
                    return None
            root = await self._portfolio(unit.root_id)
            try:
                result = await self._run_merge(unit, root, idempotency)
            finally:
                # Merged (or perhaps merged: a failed commit may have landed): re-read it.
                self._portfolios.pop(unit.id, None)
        self.risk.after_merge(unit.account_ids)
        return result

    async def _run_merge(self, unit: Portfolio, root: Portfolio, idempotency) -> GrowthOperation:
        merge_id = new_id("mrg")
        now = self.clock()
        touched = [*unit.account_ids, root.compounding_account_id]
        when = growth.merge_date([await self.get_account(i) for i in touched])
        steps = []
        for account_id, command in growth.merge_steps(unit, root.compounding_account_id, when):
            steps.append((account_id, command or (lambda events: growth.merge_in(unit, events, when)), NO_SKIP))

        def render(decided: Decided) -> GrowthOperation:
            legs = decided.transactions
            amount = sum(leg.amount for leg in legs if leg.direction == "credit")
            return GrowthOperation(id=merge_id, kind="merge", portfolio_id=unit.id, amount=amount, created_at=now,
                                   legs=legs)

        return await self._run_steps(steps, render, idempotency, correlation_id=merge_id)

    async def reinvest_portfolio(self, portfolio_id: str, quarter: str, *,
                                 idempotency_key: str | None = None) -> reports.Reinvestment:
        """Quarterly reinvestment of every Rev-Acc and Com-Acc in the portfolio and the
        units below it, in one commit. Accounts already reinvested for the quarter (or
        opened after it, or closed) are skipped; if all are, 409 already_reinvested."""
        request = _validate(ReinvestRequest, quarter=quarter)
        self._check_id(portfolio_id)

        async def run(idempotency):
            tree = await self.portfolio_tree(portfolio_id)
            steps = [(account.id, Reinvest(quarter=request.quarter), REINVEST_SKIPS)
                     for node in tree.nodes for account in node.accounts
                     if account.type in self.rules.reinvested_types and account.status not in ("closed", "merged")]
            if not steps:
                raise Refused("no account of this portfolio reinvests", {"portfolio_id": portfolio_id},
                              code="already_reinvested")
            def render(decided: Decided) -> reports.Reinvestment:
                return reports.reinvestment_report(portfolio_id, request.quarter, decided.events, decided.skipped)

            return await self._run_steps(steps, render, idempotency, correlation_id=new_id("rnv"))

        return await self._idempotent(idempotency_key, ("reinvest", portfolio_id, request),
                                      reports.Reinvestment, run)

    async def _reinvest_everything(self, quarter: str) -> None:
        """The quarterly schedule: once a quarter has ended, reinvest it for every root
        portfolio (idempotent: accounts already done are skipped)."""
        AUDIT_CONTEXT.set(AuditContext(SCHEDULER, request_id=f"schedule-{quarter}"))
        after, done = "", 0
        while True:
            try:
                rows = await self.store.fetch("SELECT id FROM portfolios WHERE parent_id IS NULL AND id > $1 "
                                              "ORDER BY id LIMIT 200", after)
            except EngineError as error:
                # The database is away: try the whole quarter again at the next tick
                # (idempotent: portfolios already done are skipped).
                log.warning("scheduled reinvestment of %s postponed: %s", quarter, error.message)
                self._scheduled_quarter = None
                return
            if not rows:
                break
            for row in rows:
                after = row["id"]
                try:
                    await self.reinvest_portfolio(after, quarter)
                    done += 1
                except EngineError:
                    continue
        if done:
            log.info("scheduled reinvestment of %s: %d portfolios", quarter, done)

    async def project(self, *, initial_capital: int, weeks: int, weekly_return_bps: dict, start_date: date | None = None,
                      include_weeks: bool = True, **overrides) -> projection.Projection:
        """Simulates a new portfolio week by week with the live rule functions (on a
        worker thread: ten years take a fraction of a second)."""
        request = _validate(ProjectionRequest, initial_capital=initial_capital, weeks=weeks,
                            weekly_return_bps=weekly_return_bps, start_date=start_date, include_weeks=include_weeks,
                            **overrides)
        return await asyncio.to_thread(run_projection, request, self.rules, self.clock().date())

    # -- analytics ---------------------------------------------------------------------
    @staticmethod
    def _check_weeks(weeks: Any) -> None:
        if weeks is not None and (not isinstance(weeks, int) or isinstance(weeks, bool)
                                  or not 1 <= weeks <= limits.ANALYTICS_WEEKS_MAX):
            raise ValidationFailed(f"weeks must be 1 to {limits.ANALYTICS_WEEKS_MAX}", {"field": "weeks"})

    async def account_analytics(self, account_id: str, *, weeks: int | None = None) -> analytics.AccountAnalytics:
        """Performance, risk, trend and forecast of one account from its ledger (see
        docs/analytics.md for every formula); `weeks` limits the window."""
        self._check_weeks(weeks)
        account = await self.get_account(account_id)
        portfolio, states = None, {account_id: account}
        if account.portfolio_id is not None:
            portfolio = await self._portfolio(account.portfolio_id)
            states = {**await self.store.load_accounts(list(portfolio.account_ids)), account_id: account}
        unit = portfolio if portfolio is not None and portfolio.is_unit and portfolio.status == "active" else None
        # A unit's forecast needs its other accounts' histories (the merge is the unit's).
        ids = [account_id] + ([i for i in portfolio.account_ids if i != account_id] if unit else [])
        ledger = await self.store.analytics_weeks(ids)
        siblings = [(states[i], ledger[i]) for i in ids[1:] if i in states] if unit else None
        portfolio_balance = sum(s.balance for s in states.values()) if portfolio is not None else None
        today = self.clock().date()
        result = await asyncio.to_thread(
            analytics.account_analytics, account, ledger[account_id], today=today, weeks=weeks, rules=self.rules,
            risk_free_rate=self.settings.analytics.risk_free_rate,
            required_return=self.settings.analytics.required_return, portfolio_balance=portfolio_balance, unit=unit,
            siblings=siblings)
        flagged = "drawdown_breach" in result.risk.flags if weeks is None else None
        if flagged is not None and flagged != (account_id in self.risk.flags):
            # The live flag disagrees (history imported, or a check still queued): settle it.
            await self.risk.check(account_id)
        return result

    async def portfolio_analytics(self, portfolio_id: str, *, weeks: int | None = None) -> analytics.PortfolioAnalytics:
        """The same over a portfolio and every unit below it, with the fork tree's growth."""
        self._check_weeks(weeks)
        root = await self._portfolio(portfolio_id)
        portfolios = await self.store.portfolio_tree(portfolio_id, depth_max=self.rules.portfolio_depth_max + 1,
                                                     nodes_max=self.settings.engine.tree_nodes_max)
        ids = [i for p in portfolios for i in p.account_ids]
        # Three independent reads over the pool: at once, not one after another.
        accounts, ledger, moved = await asyncio.gather(
            self.store.load_accounts(ids), self.store.analytics_weeks(ids), self.store.growth_moved(ids))
        return await asyncio.to_thread(
            analytics.portfolio_analytics, root, portfolios, accounts, ledger, today=self.clock().date(),
            weeks=weeks, rules=self.rules, risk_free_rate=self.settings.analytics.risk_free_rate,
            required_return=self.settings.analytics.required_return, moved=moved)

    def drawdown_breaches(self) -> dict[str, float]:
        """Accounts whose drawdown_breach flag is set, with the drawdown that set it."""
        return self.risk.breaches()

    # -- events ------------------------------------------------------------------------
    async def events_page(self, *, after: int = 0, limit: int = limits.PAGE_SIZE_DEFAULT,
                          owner: str | None = None) -> list:
        """Committed events after `after`, in commit order; with `owner`, only the events
        of that owner's accounts and portfolios."""
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ValidationFailed("after must be a non-negative integer", {"field": "after"})
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
            raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
        return await self.store.events_after(after, limit, owner)

    async def events(self, *, after: int | None = None):
        """Every committed event after `after` (default: from now on), in commit order,
        forever: an async iterator. Resume after a restart by passing the last `seq`."""
        if after is None:
            rows = await self.store.fetch("SELECT coalesce(max(seq), 0) AS seq FROM events")
            after = rows[0]["seq"]
        while True:
            signal = self._commit_signal
            page = await self.store.events_after(after, 500)
            for event in page:
                after = event.seq
                yield event
            if not page:
                try:
                    await asyncio.wait_for(signal.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    pass

    def subscribe(self, callback: Callable[[Any], Any], *, after: int | None = None) -> asyncio.Task:
        """Calls `callback(event)` (a function or a coroutine function) for every event
        committed after `after`; cancel the returned task to stop."""
        async def deliver():
            async for event in self.events(after=after):
                outcome = callback(event)
                if asyncio.iscoroutine(outcome):
                    await outcome

        return self._in_background(deliver())

    # -- supervision and faults --------------------------------------------------------
    async def inject_fault(self, account_id: str) -> dict:
        """Tests only (`engine.fault_injection`): the account's actor fails on its next
        message. Refused as unknown when fault injection is off."""
        if not self.settings.engine.fault_injection:
            raise NotFound("fault injection is disabled", {})
        self._check_id(account_id)
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

    # -- reads from the database -----------------------------------------------------
    async def get_transaction(self, transaction_id: str) -> Transaction:
        self._check_id(transaction_id)
        transaction = await self.store.get_transaction(transaction_id)
        if transaction is None:
            raise NotFound("no such transaction", {"transaction_id": transaction_id})
        return transaction

    async def list_transactions(self, account_id: str, *, limit: int = limits.PAGE_SIZE_DEFAULT,
                                cursor: str | None = None) -> Page:
        """Newest first. The cursor is the `sequence` of the last item seen."""
        self._check_id(account_id)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
            raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
        before = None
        if cursor is not None:
            if not (isinstance(cursor, str) and cursor.isascii() and cursor.isdigit() and len(cursor) < 19):
                raise ValidationFailed("malformed cursor", {"field": "cursor"})
            before = int(cursor)
        if self.registry.peek(account_id) is None and await self.store.load_account(account_id) is None:
            raise NotFound("no such account", {"account_id": account_id})
        items = await self.store.list_transactions(account_id, limit=limit + 1, before_sequence=before)
        next_cursor = str(items[limit - 1].sequence) if len(items) > limit else None
        return Page(items=items[:limit], next_cursor=next_cursor)

    @staticmethod
    def _check_id(value: Any, field: str = "id") -> None:
        """An id that cannot exist is simply not found (no database round trip)."""
        if not _clean_text(value, limits.ID_LENGTH_MAX):
            raise NotFound("no such resource", {field: str(value)[:limits.ID_LENGTH_MAX].replace("\x00", "")})

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


def _render_first_leg(decided: Decided):
    first = decided.transactions[0]
    growth = _fork_of(decided)
    return first if growth is None else msgspec.structs.replace(first, growth=growth)


def _fork_of(decided: Decided) -> Growth | None:
    """The fork a credit triggered (its id and the new unit), if any."""
    for event in decided.events:
        if type(event) is PortfolioOpened:
            fork_id = next(t.correlation_id for t in decided.transactions if t.kind == "fork")
            return Growth(fork_id=fork_id, unit_id=event.portfolio.id)
    return None


def _with_merge(result, merged: GrowthOperation | None):
    """`result` (a credit's reply) saying which merge followed it, if one did."""
    if merged is None:
        return result
    growth = msgspec.structs.replace(result.growth or Growth(), merge_id=merged.id)
    return msgspec.structs.replace(result, growth=growth)


def _render_fork(decided: Decided):
    legs = decided.transactions
    debit = legs[0]
    unit = decided.states[debit.counterparty_account_id].portfolio_id
    return GrowthOperation(id=debit.correlation_id, kind="fork", portfolio_id=unit, amount=debit.amount,
                           created_at=debit.created_at, legs=legs)


def run_projection(request: ProjectionRequest, rules, today: date) -> projection.Projection:
    overrides = {name: getattr(request, name) for name in ("fork_threshold_cents", "merge_threshold_cents")
                 if getattr(request, name) is not None}
    for name in ("cash_buffer_bps", "capital_share_bps"):
        value = getattr(request, name)
        if value is not None:
            overrides[name] = {**getattr(rules, name), **value}
    if overrides:
        try:
            rules = msgspec.structs.replace(rules, **overrides)
            rules.__post_init__()
        except ValueError as error:
            field = next((name for name in overrides if str(error).startswith(name)), "")
            raise ValidationFailed(str(error), {"field": field, "reason": str(error)}) from None
    returns = msgspec.structs.asdict(request.weekly_return_bps)
    try:
        result = projection.project(initial_capital=request.initial_capital, weeks=request.weeks,
                                    weekly_return_bps=returns, start=request.start_date or today, rules=rules)
    except Refused as refusal:
        # The simulated accounts hit a rule limit (a balance past 10^17 cents): the inputs
        # describe an impossible portfolio.
        raise ValidationFailed(f"the projection breaks a rule: {refusal.message}",
                               {"field": "weeks", "reason": refusal.code}) from None
    return result if request.include_weeks else msgspec.structs.replace(result, weeks=[])


def _render_account(account_id: str):
    return lambda decided: decided.states[account_id]


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
