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
import hashlib
import logging
import threading
from datetime import date, datetime, timezone
from typing import Any, Awaitable, Callable, TypeVar

import msgspec

from engine import limits
from engine.errors import EngineError, IdempotencyKeyReused, NotFound, Overloaded, Unavailable, ValidationFailed
from engine.model import (
    Account, BookTrade, Close, Deposit, Transaction, Transfer, TransferDebit, UpdateAccount, Withdraw,
)
from engine.requests import (
    CreateAccountRequest, DepositRequest, TradeRequest, TransferRequest, UpdateAccountRequest, WithdrawalRequest,
)
from engine.rules import DEFAULT_RULES, open_account
from actors.account import AccountActor, AccountActorHooks, Operation, Read, ReloadIfStale, Reply, Resolved
from actors.ids import new_id, next_op_id
from actors.metrics import Metrics
from actors.registry import Registry
from actors.runtime import ActorPool
from actors.settings import Settings, load_settings
from persistence.embedded import EmbeddedServer
from persistence.store import Store
from persistence.writer import Writer, WriteOp

log = logging.getLogger("alluse.engine")
T = TypeVar("T")

MAINTENANCE_INTERVAL_S = 1.0
SHUTDOWN_DRAIN_S = 10.0
DATABASE_START_WAIT_S = 30.0


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
        self.rules = DEFAULT_RULES
        self.ready = False
        self.database_url: str | None = None
        self._embedded: EmbeddedServer | None = None
        self.store: Store | None = None
        self.writer: Writer | None = None
        self.registry: Registry | None = None
        self._pool: ActorPool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = 0
        self._idempotent_ops: dict[str, tuple[str, asyncio.Future]] = {}
        self._maintenance: asyncio.Task | None = None
        self._hooks: AccountActorHooks | None = None

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
            self._embedded = EmbeddedServer(database.data_dir)
            url = await asyncio.to_thread(self._embedded.start)
        self.database_url = url
        self.store = Store(url, pool_size=database.pool_size)
        await self._open_store()
        applied = await self.store.migrate()
        if applied:
            log.info("applied migrations: %s", ", ".join(applied))
        settings = self.settings.engine
        self.writer = Writer(self.store, batch_size_max=settings.batch_size_max, queue_max=settings.write_queue_max,
                             notify=self._notify_resolved, metrics=self.metrics,
                             batch_wait_s=settings.batch_wait_ms / 1000)
        await self.writer.start()
        self._pool = ActorPool(settings.actor_workers, name="account")
        self.registry = Registry(load=self.store.load_account, spawn=self._spawn,
                                 resident_max=settings.resident_accounts_max, metrics=self.metrics)
        self._hooks = AccountActorHooks(submit=self.writer.submit, is_poisoned=self.writer.poisoned.__contains__,
                                        self_tell=self._tell_from_any_thread, on_failed=self._actor_failed,
                                        rules=self.rules)
        self.metrics.resident_actors.set_function(lambda: len(self.registry))
        self.metrics.operations_in_flight.set_function(lambda: self._in_flight)
        self.metrics.write_queue_depth.set_function(lambda: self.writer.queue.qsize())
        self._maintenance = asyncio.create_task(self._maintain(), name="alluse-maintenance")
        self.ready = True
        log.info("engine ready")

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
        self.ready = False
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        deadline = self._loop.time() + SHUTDOWN_DRAIN_S if self._loop else 0
        while self._in_flight and self._loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self.writer is not None:
            await self.writer.stop()
        if self.registry is not None:
            self.registry.stop_all()
        if self._pool is not None:
            await asyncio.to_thread(self._pool.stop)
            self._pool = None
        if self.store is not None:
            await self.store.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
            self._embedded = None

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL_S)
            self.registry.passivate_idle(self.settings.engine.passivate_idle_s)
            if not self.writer.healthy and not self.writer.queue.qsize():
                await self.writer.ensure_connection()
            if self.writer.healthy:
                for account_id in list(self.writer.poisoned):
                    self.registry.tell(account_id, ReloadIfStale())

    async def check_ready(self) -> bool:
        """Readiness: recovery done and the database reachable."""
        if not self.ready:
            return False
        try:
            await self.store.ping()
            return True
        except EngineError:
            return False

    # -- wiring ----------------------------------------------------------------------
    def _spawn(self, account: Account):
        return AccountActor.start(self._pool, account, self._hooks)

    def _notify_resolved(self, resolutions) -> None:
        for account_id, resolution in resolutions.items():
            self.registry.tell(account_id, Resolved(resolution))

    def _tell_from_any_thread(self, account_id: str, message: Any) -> None:
        self._loop.call_soon_threadsafe(self.registry.tell, account_id, message)

    def _actor_failed(self, account_id: str, ref: Any) -> None:
        log.error("account actor %s failed; it will be activated anew from committed state", account_id)
        self.metrics.actor_failures.inc()
        self._loop.call_soon_threadsafe(self.registry.forget, account_id, ref)

    # -- admission, idempotency, timeouts --------------------------------------------
    def _admit(self) -> None:
        if not self.ready:
            raise Unavailable("the engine is not running", code="not_ready")
        if self._in_flight >= self.settings.engine.operations_in_flight_max:
            raise Overloaded("too many operations in flight; retry shortly",
                             {"operations_in_flight_max": self.settings.engine.operations_in_flight_max})

    async def _bounded(self, awaitable: Awaitable[T]) -> T:
        """Waits at most `operation_timeout_s`. A keyed operation is a task that goes on
        after the wait ends (its key stays in flight until it resolves)."""
        try:
            async with asyncio.timeout(self.settings.engine.operation_timeout_s):
                return await awaitable
        except TimeoutError:
            raise Unavailable("the operation did not finish in time; retry with the same idempotency key",
                              code="operation_timeout") from None

    async def _idempotent(self, key: str | None, fingerprint: str, result_type: type[T],
                          run: Callable[[tuple[str, str] | None], Awaitable[T]]) -> T:
        """Runs `run` at most once per key. A retry while the first is in flight waits for
        its outcome; a retry after it committed gets the stored result (also after a
        restart); the same key with another request is refused."""
        if key is None:
            self._admit()
            return await self._bounded(self._counted(run(None)))
        if not isinstance(key, str) or not 1 <= len(key) <= limits.IDEMPOTENCY_KEY_LENGTH_MAX:
            raise ValidationFailed("the idempotency key must be 1 to 200 characters", {"field": "Idempotency-Key"})
        in_flight = self._idempotent_ops.get(key)
        if in_flight is not None:
            if in_flight[0] != fingerprint:
                raise IdempotencyKeyReused("this idempotency key was used with a different request", {"key": key})
            return await self._bounded(asyncio.shield(in_flight[1]))
        self._admit()
        task = asyncio.ensure_future(self._counted(self._lookup_or_run(key, fingerprint, result_type, run)))
        self._idempotent_ops[key] = (fingerprint, task)
        task.add_done_callback(lambda _: self._idempotent_ops.pop(key, None))
        return await self._bounded(asyncio.shield(task))

    async def _lookup_or_run(self, key, fingerprint, result_type, run):
        stored = await self.store.idempotent_response(key)
        if stored is not None:
            if stored[0] != fingerprint:
                raise IdempotencyKeyReused("this idempotency key was used with a different request", {"key": key})
            return msgspec.json.decode(stored[1], type=result_type)
        return await run((key, fingerprint))

    async def _counted(self, awaitable: Awaitable[T]) -> T:
        self._in_flight += 1
        try:
            return await awaitable
        finally:
            self._in_flight -= 1

    async def _on_account(self, account_id: str, command, render, idempotency, *, transaction_id=None,
                          correlation_id=None, target_id: str | None = None):
        """Sends one command to an account actor (leased for the duration) and waits for
        the continuation the writer or the actor completes."""
        source = await self.registry.acquire(account_id)
        target = None
        try:
            if source.leases > self.settings.engine.account_operations_in_flight_max:
                raise Overloaded("too many operations in flight on this account", {"account_id": account_id})
            if target_id is not None:
                target = await self.registry.acquire(target_id)
            future = self._loop.create_future()
            operation = Operation(
                op_id=next_op_id(), command=command, reply=Reply(self._loop, future), now=self.clock(),
                transaction_id=transaction_id or new_id("txn"), render=render, correlation_id=correlation_id,
                idempotency=idempotency, target=target.ref if target else None,
                credit_transaction_id=new_id("txn") if target else None)
            if not self.registry.tell(account_id, operation):
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await future
        finally:
            self.registry.release(source)
            if target is not None:
                self.registry.release(target)

    # -- accounts --------------------------------------------------------------------
    async def create_account(self, *, name: str, type: str, owner: str, opened_on: date | None = None,
                             idempotency_key: str | None = None) -> Account:
        request = _validate(CreateAccountRequest, name=name, type=type, owner=owner, opened_on=opened_on)

        async def run(idempotency):
            account = open_account(account_id=new_id("acc"), name=request.name, account_type=request.type,
                                   owner=request.owner, opened_on=request.opened_on, now=self.clock())
            future = self._loop.create_future()
            self.writer.enqueue(WriteOp(op_id=next_op_id(), accounts=(account.id,), creates=(account,),
                                        idempotency=idempotency, done=Reply(self._loop, future).done_on_loop,
                                        render=lambda _, states: states[account.id]))
            return await future

        return await self._idempotent(idempotency_key, _fingerprint("create_account", None, request), Account, run)

    async def get_account(self, account_id: str) -> Account:
        """The committed state, from the resident actor (reads keep working while the
        database is down) or activated from the database."""
        self._check_id(account_id)
        self._admit()
        entry = await self.registry.acquire(account_id)
        try:
            future = self._loop.create_future()
            if not self.registry.tell(account_id, Read(Reply(self._loop, future))):
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await self._bounded(future)
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

        return await self._idempotent(idempotency_key, _fingerprint("update_account", account_id, request),
                                      Account, run)

    async def close_account(self, account_id: str, *, idempotency_key: str | None = None) -> Account:
        self._check_id(account_id)
        return await self._idempotent(
            idempotency_key, _fingerprint("close_account", account_id, Close()), Account,
            lambda idempotency: self._on_account(account_id, Close(), _render_account(account_id), idempotency))

    # -- money -----------------------------------------------------------------------
    async def deposit(self, account_id: str, amount: int, *, memo: str | None = None,
                      idempotency_key: str | None = None) -> Transaction:
        request = _validate(DepositRequest, amount=amount, memo=memo)
        return await self._single_leg("deposit", account_id, request, Deposit(amount=request.amount, memo=request.memo),
                                      idempotency_key)

    async def withdraw(self, account_id: str, amount: int, *, memo: str | None = None,
                       idempotency_key: str | None = None) -> Transaction:
        request = _validate(WithdrawalRequest, amount=amount, memo=memo)
        return await self._single_leg("withdraw", account_id, request,
                                      Withdraw(amount=request.amount, memo=request.memo), idempotency_key)

    async def book_trade(self, account_id: str, *, kind: str, amount: int, effective_date: date | None = None,
                         memo: str | None = None, idempotency_key: str | None = None) -> Transaction:
        request = _validate(TradeRequest, kind=kind, amount=amount, effective_date=effective_date, memo=memo)
        command = BookTrade(kind=request.kind, amount=request.amount, memo=request.memo,
                            effective_date=request.effective_date)
        return await self._single_leg("trade", account_id, request, command, idempotency_key)

    async def _single_leg(self, operation: str, account_id: str, request, command, idempotency_key) -> Transaction:
        self._check_id(account_id)
        return await self._idempotent(
            idempotency_key, _fingerprint(operation, account_id, request), Transaction,
            lambda idempotency: self._on_account(account_id, command, _render_first_leg, idempotency))

    async def transfer(self, from_account: str, to_account: str, amount: int, *, memo: str | None = None,
                       idempotency_key: str | None = None) -> Transfer:
        """Both legs commit in one database transaction or neither does."""
        request = _validate(TransferRequest, from_account=from_account, to_account=to_account, amount=amount,
                            memo=memo)
        if request.from_account == request.to_account:
            raise ValidationFailed("from_account and to_account must differ", {"field": "to_account"})

        async def run(idempotency):
            transfer_id = new_id("xfr")
            now = self.clock()

            def render(legs, _states):
                return Transfer(id=transfer_id, kind="transfer", from_account=request.from_account,
                                to_account=request.to_account, amount=request.amount, memo=request.memo,
                                created_at=now, legs=legs)

            command = TransferDebit(to_account=request.to_account, amount=request.amount, memo=request.memo)
            return await self._on_account(request.from_account, command, render, idempotency,
                                          correlation_id=transfer_id, target_id=request.to_account)

        return await self._idempotent(idempotency_key, _fingerprint("transfer", None, request), Transfer, run)

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
            if not (isinstance(cursor, str) and cursor.isdigit() and len(cursor) < 19):
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
            "operations_in_flight": self._in_flight,
            "write_queue_depth": self.writer.queue.qsize(),
            "batches_committed": self.writer.batches,
            "operations_committed": self.writer.operations,
            "poisoned_accounts": sorted(self.writer.poisoned)[:100],
            "mailbox_depths": dict(sorted(depths.items(), key=lambda kv: -kv[1])[:20]),
        }


def _render_first_leg(legs, _states):
    return legs[0]


def _render_account(account_id: str):
    return lambda _legs, states: states[account_id]


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
