"""The persistence actor: the one writer. An asyncio task on the engine's loop, fed
through a bounded queue. Each operation it takes is already decided, with its rows in
their committed shape (`engine.ledger.Rows`: entries with `balance_after` and `sequence`,
account states, outbox events) and its answer; it never re-applies a rule or builds an
answer. Per batch it coalesces each account's state into one guarded update, numbers
the events and hash-chains the audit records in commit order, writes everything in one
statement (one implicit transaction, one round trip, one fsync for many operations), and
only then resolves the callers.

Two cohorts (decision 82): a batch holds at most half of the operations in flight in the
engine (and at most `batch_size_max`), and the next batch goes out in the same step as
the previous one's outcome arrives, before that one's callers are answered (a loop turn
later). So while one cohort commits, the other is being decided: the engine's CPU and
PostgreSQL's overlap instead of taking turns.

While a statement is in flight, the next batch is built ahead once a full cohort waits
(decision 84): at most one such batch, on the heads the sending batch will leave, written
only if that batch committed exactly as built; otherwise its operations are queued first
again and built anew.

Statements never overlap (one connection), so batches commit strictly in order: the
audit chain is the commit order, and each account's operations commit in the order its
actor decided them (the actors submit in that order, on the same loop).

If a batch fails, every operation in it fails, and the accounts it touched are
*poisoned*: later operations on them fail too until their actor reloads its state from
the database through this same queue (`ReloadOp`), so nothing decided on a state that
did not survive can be written. A batch that meets an idempotency key committed before
is sent again without that operation, which is answered with the stored result."""
from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import msgspec

from engine import audit
from engine.errors import DatabaseUnavailable, EngineError, KeyCommitted, Overloaded, Unavailable
from engine.ledger import Rows
from engine.model import Account
from persistence import store as sql
from persistence.batch import BatchWrite, EventRow, KeyRow, RareRows, account_updates, audit_row, encode_json, \
    entry_rows, rare_args
from persistence.store import KeyConflict, StatementRejected, Store, account_from_row, translated_errors

log = logging.getLogger("alluse.writer")

RECONNECT_INTERVAL_S = 0.5
# A batch's share of the operations in flight: half (two cohorts), at least COHORT_MIN,
# at most COHORT_MAX. With 1,000 callers, cohorts of 500 made each loop turn decide 500
# operations while the committed batch's answer waited behind them (5,900/s); batches
# of 128 keep the pipe full (9,900/s, same run; 64 and 256 were slower).
COHORT_MIN = 16
COHORT_MAX = 128
# Expired idempotency keys deleted per statement, and statements per purge (the rest
# waits for the next purge, so one purge never holds the writer for long).
PURGE_CHUNK_ROWS = 5_000
PURGE_CHUNKS_MAX = 20


class WriteOp(msgspec.Struct, eq=False):
    """One decided operation: its rows, its answer (`result`), the idempotency record and
    audit entry to commit with it. `done(result, error)` runs on the writer's loop after
    the batch commits (or fails). `accounts` are the existing accounts whose actors hold
    it in flight."""

    op_id: int
    accounts: tuple[str, ...]
    done: Callable[[Any, BaseException | None], None]
    result: Any = None
    rows: Rows | None = None
    # The idempotency key's claim (`actors.idempotency.KeyClaim`: key, fingerprint).
    idempotency: Any = None
    # The audit record to commit with the operation (None: nothing to record).
    audit: "AuditEntry | None" = None
    # API tokens created and revoked (token id, revoked at) by the operation.
    tokens: tuple = ()
    revocations: tuple[tuple[str, Any], ...] = ()


class AuditEntry(msgspec.Struct, eq=False):
    """What to record of one operation: the request it belongs to, the action and its
    target. `outcome` is "committed" for a change; the gateway records refusals."""

    context: audit.AuditContext
    action: str
    target: str | None = None
    outcome: str = "committed"
    details: dict | None = None


@dataclass(slots=True, eq=False)
class ReloadOp:
    """Read one account's committed row after every earlier operation, and lift its poison."""

    account_id: str
    done: Callable[[Account | None, BaseException | None], None]


@dataclass(slots=True, eq=False)
class PurgeKeysOp:
    """Delete idempotency keys older than `retention_s` (by the database's clock), in
    bounded chunks, between batches; `done(count, error)`."""

    retention_s: float
    done: Callable[[int, BaseException | None], None]


@dataclass(slots=True, eq=False)
class FlagOp:
    """Set (`active`) or clear one account's drawdown_breach flag, with its event, after
    every earlier write; `done(None, error)`."""

    account_id: str
    portfolio_id: str | None
    active: bool
    drawdown: float
    limit: float
    at: datetime
    done: Callable[[Any, BaseException | None], None]


class Resolution(msgspec.Struct):
    """What the writer tells an account's actor after a batch: which of its operations
    committed (with the committed state) and which failed."""

    committed_op_ids: list[int] = msgspec.field(default_factory=list)
    failed_op_ids: list[int] = msgspec.field(default_factory=list)
    state: Account | None = None


class WriteQueue:
    """The writer's inbox: `asyncio.Queue`'s interface for one consumer on one loop,
    without its per-item bookkeeping (an item costs a deque append; the consumer is woken
    at most once per wait, not once per item)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def take_all(self) -> list:
        items = list(self._items)
        self._items.clear()
        return items

    async def get(self) -> Any:
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        return self._items.popleft()


class Writer:
    def __init__(self, store: Store, *, batch_size_max: int, queue_max: int,
                 notify: Callable[[dict[str, Resolution]], None], metrics=None, batch_wait_s: float = 0.0,
                 on_commit: Callable[[], None] | None = None, in_flight: Callable[[], int] | None = None):
        self.store = store
        self.batch_size_max = batch_size_max
        self.batch_wait_s = batch_wait_s
        self.queue = WriteQueue()
        self.queue_max = queue_max
        self.notify = notify
        self.on_commit = on_commit
        # The engine's count of operations in flight (`_limit` sizes the cohorts by it).
        self.in_flight = in_flight
        self.metrics = metrics
        self.poisoned: set[str] = set()
        self._inbox: collections.deque = collections.deque()
        self._wakeup_pending = False
        self.connection = None
        self.healthy = False
        self._last_connect_attempt = 0.0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._connect_lock = asyncio.Lock()
        self.batches = 0
        self.operations = 0
        # The audit chain's head (last sequence number and hash); None = read it again
        # before the next batch (after a write whose outcome is unknown).
        self._audit_head: tuple[int, str] | None = None
        # The number of the last committed event (the writer numbers events itself).
        self._event_head: int | None = None
        # Operations taken but not yet sent, and the statement in flight.
        self._waiting: collections.deque[WriteOp] = collections.deque()
        self._inflight: asyncio.Future | None = None
        # The batch whose statement is in flight, the next batch built ahead on what it
        # leaves (`_build_ahead`), and the serial number of the last batch that committed
        # (a number, not the batch: nothing of a committed batch is kept alive).
        self._sending: _Batch | None = None
        self._ahead: _Batch | None = None
        self._serials = itertools.count(1)
        self._last_committed = 0
        self.built_ahead = 0        # batches built ahead
        self.ahead_discarded = 0    # ... that did not fit (their operations were rebuilt)
        # Committed batches whose actors and callers are answered on the next loop turn.
        self._deliveries: collections.deque = collections.deque()
        self._deliver_pending = False
        self._delivering = False
        # The database supervisor's hooks (actors.availability): `on_connect(connection)`
        # runs on every new connection before its first use (it takes the writer's lock,
        # or raises an EngineError and the connection is not used); `on_error(error, n)`
        # hears of every failed batch; while `refusal` is set the writer does not try to
        # connect and refuses with it (`pause`/`resume`).
        self.on_connect: Callable[[Any], Any] | None = None
        self.on_error: Callable[[EngineError, int], None] | None = None
        self.refusal: EngineError | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self.ensure_connection()
        self._task = asyncio.create_task(self._run(), name="alluse-writer")

    async def stop(self) -> None:
        """Flushes what is queued, then stops."""
        if self._task is not None:
            await self.queue.put(None)
            await self._task
            self._task = None
        if self.connection is not None:
            self.store.ledger_weeks.clear(fed=False)
            await self.connection.close()
            self.connection = None

    # -- submission ------------------------------------------------------------------
    def submit(self, op: "WriteOp | ReloadOp | PurgeKeysOp | FlagOp") -> None:
        """Hands `op` to the writer: at once from the writer's loop (where the actors run),
        thread-safe from anywhere else (one loop wake-up moves all that arrived meanwhile).
        The loop's thread is told by its id: `asyncio._get_running_loop()` costs a
        getpid() system call, once per operation."""
        if threading.get_ident() == self._loop_thread or self._loop_thread is None:   # or not started yet
            self.enqueue(op)
            return
        self._inbox.append(op)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._wakeup_pending = False
        inbox = self._inbox
        while inbox:
            self.enqueue(inbox.popleft())

    def enqueue(self, op: WriteOp | ReloadOp | PurgeKeysOp) -> None:
        """On the writer's loop. A full queue refuses at once (bounded memory)."""
        if self.queue.qsize() >= self.queue_max and isinstance(op, WriteOp):
            self._fail([op], Overloaded("the write queue is full", {"queue_max": self.queue_max}))
            return
        self.queue.put_nowait(op)

    # -- the loop --------------------------------------------------------------------
    async def _run(self) -> None:
        """The writer's loop. It must outlive any bug in one batch: an escaped exception
        is logged, whatever was taken but not yet committed is failed (safe to retry),
        and the loop goes on."""
        while True:
            try:
                if not await self._run_once():
                    return
            except Exception:  # noqa: BLE001 - keep writing; the cause is in the log
                log.exception("writer loop error; continuing")
                ops = list(self._waiting)
                self._waiting.clear()
                if self._ahead is not None:
                    ops[:0] = self._ahead.ops
                    self._ahead = None
                self._fail(ops, Unavailable("internal error in the writer; retry", code="write_failed"), poison=True)

    async def _run_once(self) -> bool:
        """Takes everything queued and sends the next batch once no statement is in
        flight. False once the stop marker has been reached."""
        item = await self.queue.get()
        if self.batch_wait_s > 0 and self._inflight is None and self.queue.qsize() < self.batch_size_max:
            await asyncio.sleep(self.batch_wait_s)
        items = [item, *self.queue.take_all()]
        stopping = False
        waiting = self._waiting
        for item in items:
            if type(item) is WriteOp:
                waiting.append(item)
            elif item is _WAKE:
                continue
            elif item is None:
                stopping = True
            elif isinstance(item, ReloadOp):
                # Behind every earlier write: flush them (and wait for their commit) first.
                await self._flush()
                await self._reload(item)
            elif isinstance(item, FlagOp):
                await self._flush()
                await self._flag(item)
            else:
                await self._flush()
                await self._purge_keys(item)
        self._advance()
        if stopping:
            await self._flush()
        return not stopping

    def _advance(self) -> None:
        """Sends the next batch if nothing is in flight; otherwise builds the next one
        ahead once its cohort is complete."""
        if self._inflight is None:
            if self._waiting:
                self._inflight = asyncio.ensure_future(self._commit_in_flight(self._take()))
        elif self._ahead is None and self._sending is not None:
            self._build_ahead()

    def _build_ahead(self) -> None:
        """While a batch commits, the next one is built (coalesced, numbered, hash-chained
        and encoded) as soon as a full cohort waits, on the heads the sending batch leaves:
        its statement then goes out the moment the previous outcome arrives, instead of
        ~0.3 ms later (decision 84). It is used only if that batch committed exactly as
        built (`_fits`); otherwise its operations go back to the front of the queue."""
        if self.poisoned or len(self._waiting) < self._limit():
            return
        sending = self._sending
        ops = self._take()
        try:
            batch = _Batch.of(ops, sending.head, sending.event_head)
            batch.write.args()
        except Exception:  # noqa: BLE001 - a bug: built again in turn, where its failure is answered
            log.exception("building a batch ahead failed; it is built again in its turn")
            self._requeue(ops)
            self._sending = None   # not again until the next statement is in flight
            return
        batch.after = (sending.serial, sending.head, sending.event_head)
        self._ahead = batch
        self.built_ahead += 1

    def _fits(self, batch: "_Batch") -> bool:
        """A batch built ahead fits if the batch it was built after is the last that
        committed, nothing wrote since (a drawdown flag numbers an event), and none of its
        accounts is poisoned."""
        serial, head, event_head = batch.after
        return (self._last_committed == serial and self._audit_head == head and self._event_head == event_head
                and all(self.poisoned.isdisjoint(op.accounts) for op in batch.ops))

    def _take_ahead(self) -> "_Batch | None":
        """The batch built ahead if it fits; else None, its operations queued first again."""
        batch, self._ahead = self._ahead, None
        if batch is None:
            return None
        if self._fits(batch):
            return batch
        self.ahead_discarded += 1
        self._requeue(batch.ops)
        return None

    def _requeue(self, ops: list[WriteOp]) -> None:
        """Operations taken for a batch that was not sent wait again, first and in order."""
        self._waiting.extendleft(reversed(ops))

    def _limit(self) -> int:
        """A batch's size: up to `batch_size_max` operations, and at most half of those in
        flight in the engine (`in_flight`, within COHORT_MIN..COHORT_MAX) so that cohorts
        form: one is decided while another commits."""
        limit = self.batch_size_max
        if self.in_flight is not None:
            limit = min(limit, COHORT_MAX, max(COHORT_MIN, (self.in_flight() + 1) // 2))
        return limit

    def _take(self) -> list[WriteOp]:
        """The operations of the next batch (`_limit`), oldest first."""
        waiting = self._waiting
        return [waiting.popleft() for _ in range(min(len(waiting), self._limit()))]

    async def _flush(self) -> None:
        """Sends everything taken so far and waits until it has committed (or failed)."""
        while self._inflight is not None or self._waiting:
            if self._inflight is not None:
                await self._inflight
            else:
                self._advance()

    async def _commit_in_flight(self, ops: list[WriteOp]) -> None:
        """Commits `ops`, then whatever is waiting, batch after batch: each next batch goes
        out in the same step as its predecessor's outcome arrives, before that one's
        callers are answered (`_committed` defers them by one loop turn)."""
        try:
            while True:
                await self._commit(ops)
                ahead = self._take_ahead()
                if ahead is not None:
                    ops = ahead
                elif self._waiting:
                    ops = self._take()
                else:
                    break
        finally:
            self._inflight = None
            self._sending = None
            if self._ahead is not None:   # an escaped error: its operations wait again
                self._requeue(self._ahead.ops)
                self._ahead = None
            self.queue.put_nowait(_WAKE)

    async def ensure_connection(self) -> bool:
        async with self._connect_lock:
            return await self._connect_if_needed()

    async def _connect_if_needed(self) -> bool:
        if self.connection is not None and not self.connection.is_closed():
            return True
        if self.refusal is not None:
            return False  # the supervisor brings the database back, then resumes us
        now = time.monotonic()
        if now - self._last_connect_attempt < RECONNECT_INTERVAL_S:
            return False
        self._last_connect_attempt = now
        connection = None
        try:
            connection = await asyncio.wait_for(self.store.connect(), timeout=3.0)
            if self.on_connect is not None:
                await self.on_connect(connection)
            self.adopt(connection)
            log.info("writer connected")
            return True
        except (EngineError, asyncio.TimeoutError) as error:
            if connection is not None:
                connection.terminate()
            self.connection = None
            self.healthy = False
            log.warning("writer cannot reach the database: %s", error)
            return False

    async def _connected(self):
        if not await self.ensure_connection():
            refusal = self.refusal
            raise refusal.again() if refusal is not None else DatabaseUnavailable("the database is unavailable")
        return self.connection

    def pause(self, refusal: EngineError) -> None:
        """The supervisor's: the database is away (or full, or another engine writes).
        Drops the connection (a statement in flight fails at once: its outcome is
        unknown, its accounts reload later) and refuses with `refusal` until `resume`."""
        self.refusal = refusal
        self._drop_connection()

    def resume(self) -> None:
        self.refusal = None
        self._last_connect_attempt = 0.0

    async def _reload(self, op: ReloadOp) -> None:
        try:
            connection = await self._connected()
            async with translated_errors():
                row = await connection.fetchrow(sql.SELECT_ACCOUNT, op.account_id)
        except EngineError as error:
            self._drop_connection()
            op.done(None, error)
            return
        self.poisoned.discard(op.account_id)
        op.done(account_from_row(row) if row else None, None)

    async def _flag(self, op: FlagOp) -> None:
        try:
            connection = await self._connected()
            async with translated_errors():
                head = await self._known_event_head(connection)
            await sql.set_risk_flag(connection, op.account_id, op.portfolio_id, seq=head + 1, active=op.active,
                                    drawdown=op.drawdown, limit=op.limit, at=op.at)
        except EngineError as error:
            self._drop_connection()   # forgets the heads: an unknown outcome is read again
            op.done(None, error)
            return
        self._event_head = head + 1
        op.done(None, None)

    async def _purge_keys(self, op: PurgeKeysOp) -> None:
        total = 0
        try:
            connection = await self._connected()
            async with translated_errors():
                cutoff = await connection.fetchval("SELECT now() - make_interval(secs => $1)", op.retention_s)
                for _ in range(PURGE_CHUNKS_MAX):
                    status = await connection.execute(sql.PURGE_IDEMPOTENCY, cutoff, PURGE_CHUNK_ROWS)
                    deleted = int(status.rsplit(" ", 1)[-1])
                    total += deleted
                    if deleted < PURGE_CHUNK_ROWS:
                        break
        except EngineError as error:
            self._drop_connection()
            op.done(total, error)
            return
        op.done(total, None)

    def adopt(self, connection) -> None:
        """Writes through `connection` from now on. Another engine may have written while
        this one had none: the weekly sums kept in memory are read again, and kept
        current from here on (`persistence.ledger_weeks`)."""
        self.connection = connection
        self.healthy = True
        self.store.ledger_weeks.clear(fed=True)

    def _drop_connection(self) -> None:
        self._audit_head = None
        self._event_head = None
        self.store.ledger_weeks.clear(fed=False)
        if self.connection is not None:
            self.connection.terminate()
            self.connection = None
        self.healthy = False

    # -- committing --------------------------------------------------------------------
    async def _commit(self, ops: "list[WriteOp] | _Batch", *, replaying: bool = False) -> None:
        """Commits `ops` as one batch (or a batch built ahead that fits). Operations on
        poisoned accounts fail at once."""
        built = None
        if type(ops) is _Batch:
            built, ops = ops, ops.ops
        poisoned = self.poisoned
        if poisoned and built is None:
            blocked = [op for op in ops if not poisoned.isdisjoint(op.accounts)]
            if blocked:
                self._fail(blocked, Unavailable("the account is reloading after a failed write; retry",
                                                code="account_reloading"))
                ops = [op for op in ops if poisoned.isdisjoint(op.accounts)]
        if not ops:
            return
        started = time.perf_counter()
        try:
            connection = self.connection
            if connection is None or connection.is_closed():
                connection = await self._connected()
            if built is None:
                async with translated_errors():
                    head = self._audit_head or await self._read_audit_head(connection)
                    event_head = await self._known_event_head(connection)
                built = _Batch.of(ops, head, event_head)
            if not built.serial:
                built.serial = next(self._serials)
            # A batch is built ahead only on one whose statement is in flight.
            batch = self._sending = built
            try:
                await sql.write_batch(connection, batch.write)
            finally:
                self._sending = None
        except KeyConflict as conflict:
            if not replaying:
                await self._replay_committed_keys(ops)
                return
            # Two operations of one batch with one key: the engine's in-flight table
            # should make that impossible.
            log.error("batch of %d repeats an idempotency key: %s", len(ops), conflict)
            self._fail(ops, Unavailable("the database rejected the operation", code="write_rejected"), poison=True)
            return
        except StatementRejected as rejection:
            # Nothing committed, and the connection is fine. One operation is bad (a bug
            # upstream, since validation should have caught it): commit the others alone.
            if len(ops) > 1:
                log.warning("batch of %d rejected (%s); committing its operations one by one", len(ops), rejection)
                for op in ops:
                    await self._commit([op], replaying=replaying)
                return
            log.error("operation %s rejected by the database: %s", ops[0].op_id, rejection)
            self._fail(ops, Unavailable("the database rejected the operation", {"reason": str(rejection)[:200]},
                                        code="write_rejected"), poison=True)
            return
        except EngineError as error:
            log.warning("batch of %d failed: %s (%s)", len(ops), error.message, error.details)
            self._drop_connection()
            self._fail(ops, error, poison=True)
            if self.on_error is not None:
                self.on_error(error, len(ops))
            return
        except Exception as error:  # a bug: fail the batch, keep the writer alive
            log.exception("batch of %d failed unexpectedly", len(ops))
            self._drop_connection()
            self._fail(ops, Unavailable("internal error while committing", {"reason": type(error).__name__}),
                       poison=True)
            return
        self._committed(batch, time.perf_counter() - started)

    async def _known_event_head(self, connection) -> int:
        """The number of the last committed event: kept, or read after a reconnect."""
        if self._event_head is None:
            self._event_head = await connection.fetchval(sql.SELECT_EVENT_HEAD)
        return self._event_head

    async def _read_audit_head(self, connection) -> tuple[int, str]:
        row = await connection.fetchrow(sql.SELECT_AUDIT_HEAD)
        self._audit_head = (row["seq"], row["hash"]) if row else (0, audit.GENESIS_HASH)
        return self._audit_head

    async def _replay_committed_keys(self, ops: list[WriteOp]) -> None:
        """The batch held idempotency keys that had committed before (a retry the engine
        could not recognise as one): nothing of it committed. Those operations are
        answered with their stored result and their accounts reload (their actors
        counted them in); operations on the same accounts fail (safe to retry), and the
        others commit as one batch again."""
        keys = [op.idempotency.key for op in ops if op.idempotency]
        try:
            async with translated_errors():
                answers = await sql.key_answers(self.connection, keys)
        except EngineError as error:
            self._drop_connection()
            self._fail(ops, error, poison=True)
            return
        stored = {key: KeyCommitted(*answer) for key, answer in answers.items()}
        replayed = [op for op in ops if op.idempotency and op.idempotency.key in stored]
        self._fail(replayed, None, poison=True, errors=[stored[op.idempotency.key] for op in replayed])
        await self._commit([op for op in ops if op not in replayed], replaying=True)

    def _committed(self, batch: "_Batch", elapsed_s: float) -> None:
        self._audit_head = batch.head
        self._event_head = batch.event_head
        self._last_committed = batch.serial
        try:
            self.store.ledger_weeks.committed(batch.before, batch.updates, batch.inserts, batch.transactions)
        except Exception:  # noqa: BLE001 - a bug in a cache must not fail writes that committed
            log.exception("keeping the weekly sums current failed; they are read from the database from now on")
            self.store.ledger_weeks.clear(fed=False)
        ops = batch.ops
        for op in ops:
            if op.audit is not None:
                op.audit.context.recorded = True
        self.batches += 1
        self.operations += len(ops)
        if self.metrics is not None:
            self.metrics.observe_batch(len(ops), elapsed_s)
            if batch.forks:
                self.metrics.forks.inc(batch.forks)
            if batch.merges:
                self.metrics.merges.inc(batch.merges)
        # Actors learn first (one message per account per batch, carrying the state the
        # whole batch left), callers second: a caller that reads after its reply is
        # queued behind the news in the account's mailbox. Both wait one loop turn, so
        # that the next batch is sent before this one's callers run.
        resolutions: dict[str, Resolution] = {}
        for op in ops:
            for account_id in op.accounts:
                resolution = resolutions.get(account_id)
                if resolution is None:
                    resolution = resolutions[account_id] = Resolution([op.op_id])
                else:
                    resolution.committed_op_ids.append(op.op_id)
        states, inserts = batch.updates, batch.inserts
        for account_id, resolution in resolutions.items():
            resolution.state = states.get(account_id) or inserts.get(account_id)
        self._deliveries.append((resolutions, ops))
        if not self._deliver_pending:
            self._deliver_pending = True
            self._loop.call_soon(self._deliver)

    def _deliver(self) -> None:
        """Answers the committed batches in commit order. A failing continuation is
        logged and skipped: it must not strand the answers queued behind it. Not
        re-entrant: an answer can make an actor submit, and a refused submission calls
        `_fail`, which must not answer later batches before the rest of this one."""
        self._deliver_pending = False
        if self._delivering:
            return
        self._delivering = True
        try:
            self._deliver_all()
        finally:
            self._delivering = False

    def _deliver_all(self) -> None:
        deliveries = self._deliveries
        while deliveries:
            resolutions, ops = deliveries.popleft()
            try:
                if resolutions:
                    self.notify(resolutions)
                if self.on_commit is not None:
                    self.on_commit()
            except Exception:  # noqa: BLE001 - a bug upstream; the callers still get their answers
                log.exception("telling the actors of a committed batch failed")
            for op in ops:
                try:
                    op.done(op.result, None)
                except Exception:  # noqa: BLE001
                    log.exception("answering operation %s failed", op.op_id)

    def _fail(self, ops: list[WriteOp], error: BaseException | None, *, poison: bool = False,
              errors: list[BaseException] | None = None) -> None:
        if not ops:
            return
        self._deliver()   # what committed before this is answered before it
        resolutions: dict[str, Resolution] = defaultdict(Resolution)
        for op in ops:
            for account_id in op.accounts:
                resolutions[account_id].failed_op_ids.append(op.op_id)
                if poison:
                    self.poisoned.add(account_id)
            if poison:
                # Its accounts reload; their weekly sums kept in memory are read again
                # too. (Where a statement's outcome is unknown, `_drop_connection` has
                # already forgotten every account; this covers a batch that committed
                # but failed in the writer afterwards, a bug its loop survives.)
                self.store.ledger_weeks.forget(op.rows.states if op.rows is not None else op.accounts)
        if resolutions:
            self.notify(resolutions)
        for index, op in enumerate(ops):
            op.done(None, errors[index] if errors else error)


# Put in the queue when a statement returns, to wake the loop for the next batch.
_WAKE = object()


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch: its operations in commit order, each account's final state (`inserts`
    for accounts it opens, `updates` for the others), what it writes (`write`), and the
    audit chain's head after it."""

    ops: list[WriteOp]
    head: tuple[int, str]
    event_head: int
    write: BatchWrite
    inserts: dict[str, Account]
    updates: dict[str, Account]
    # Each updated account's version before the batch, and the batch's ledger entries
    # (for the weekly sums kept in memory, `persistence.ledger_weeks`).
    before: dict[str, int]
    transactions: list
    forks: int = 0
    merges: int = 0
    # Numbered when its statement is sent; a batch built ahead names the batch it was
    # built after: (its serial, its audit head, its event head) (`Writer._build_ahead`).
    serial: int = 0
    after: tuple | None = None

    @classmethod
    def of(cls, ops: list[WriteOp], head: tuple[int, str], event_head: int) -> "_Batch":
        """Coalesces the operations' decided rows: each account's last state (one update
        per account however many operations touch it), every row in commit order, events
        numbered after `event_head`. A key whose answer is an event's payload refers to
        that event instead of storing the same bytes again."""
        inserts: dict[str, Account] = {}
        updates: dict[str, Account] = {}
        before: dict[str, int] = {}
        transactions: list = []
        events: list[EventRow] = []
        payloads: list[str] = []
        keys: list[KeyRow] = []
        rare = RareRows()
        seq = event_head
        for op in ops:
            decided = op.rows
            answered_by = None
            if decided is not None:
                op_before = decided.before
                for account_id, state in decided.states.items():
                    if account_id in inserts or account_id not in op_before:
                        inserts[account_id] = state    # opened by this batch
                    else:
                        updates[account_id] = state
                        if account_id not in before:
                            before[account_id] = op_before[account_id]
                transactions += decided.transactions
                result_text = None
                for row in decided.outbox:
                    seq += 1
                    if row.derived:   # rebuilt from its entries by its readers
                        payloads.append(None)
                        if row.payload is op.result:
                            answered_by = seq
                    elif row.payload is op.result:   # encoded once, for each owner's event
                        if result_text is None:
                            result_text = encode_json(op.result).decode()
                            answered_by = seq
                        payloads.append(result_text)
                    else:
                        payloads.append(encode_json(row.payload).decode())
                    events.append(EventRow(seq, row.type, row.account_id, row.portfolio_id, row.correlation_id,
                                           row.created_at, row.entry_sequence))
                if decided.portfolios:
                    rare.portfolios += decided.portfolios
                if decided.merged:
                    rare.merged += decided.merged
                if decided.reinvestments:
                    rare.reinvestments += decided.reinvestments
            if op.tokens:
                rare.tokens += op.tokens
            if op.revocations:
                rare.revocations += op.revocations
            claim = op.idempotency
            if claim is not None:
                if answered_by is None:
                    keys.append(KeyRow(claim.key, claim.fingerprint, encode_json(op.result).decode()))
                else:
                    keys.append(KeyRow(claim.key, claim.fingerprint, None, answered_by))
        rare.accounts = list(inserts.values())
        write = BatchWrite(entries=entry_rows(transactions), events=events, payloads=payloads, keys=keys,
                           rare=rare_args(rare) if rare else None)
        write.updates, write.updates_expected = account_updates(updates, before)
        batch = cls(ops=ops, head=head, event_head=seq, write=write, inserts=inserts, updates=updates,
                    before=before, transactions=transactions,
                    forks=sum(1 for p in rare.portfolios if p.is_unit), merges=len(rare.merged))
        batch.head = _chain_audit(ops, write.audit, head)
        return batch


def _chain_audit(ops: list[WriteOp], rows: list, head: tuple[int, str]) -> tuple[int, str]:
    """Links an audit record for every operation that carries one, in commit order,
    after the chain's head; returns the new head (kept once the batch commits)."""
    seq, prev_hash = head
    now = now_text = None
    for op in ops:
        entry = op.audit
        if entry is None:
            continue
        if now is None:
            now = datetime.now(timezone.utc)
            now_text = audit.canonical_time(now)
        details = dict(entry.details) if entry.details else {}
        result_id = getattr(op.result, "id", None)
        if isinstance(result_id, str):
            details["result_id"] = result_id
        reason = entry.context.reason
        if reason is not None:
            details["reason"] = reason
        seq += 1
        row = audit_row(seq, now, now_text, entry, details, prev_hash)
        rows.append(row)
        prev_hash = row.hash
    return seq, prev_hash
