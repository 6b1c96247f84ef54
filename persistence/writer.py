"""The persistence actor: the one writer. An asyncio task fed through a bounded queue;
it takes every operation waiting (up to `batch_size_max`), applies them in arrival order
to the committed account rows with the core's own `mutate` (a last safety check: a leg
that would overdraw is a bug upstream and fails alone), and commits the whole batch as
one PostgreSQL transaction. Replies go out only after COMMIT returns.

If a batch fails, every operation in it fails, and the accounts it touched are
*poisoned*: later operations on them fail too until their actor reloads its state from
the database through this same queue (`ReloadOp`), so nothing decided on a state that
did not survive can be written."""
from __future__ import annotations

import asyncio
import logging
import time
import collections
from datetime import datetime, timezone
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from engine import audit
from engine.errors import DatabaseUnavailable, EngineError, Overloaded, Unavailable
from engine.model import Account, Event, PortfolioOpened, Transaction
from persistence import store as sql
from persistence.batch import BatchRows, apply_op, encode_json, write_batch
from persistence.store import StatementRejected, Store, account_from_row, translated_errors

log = logging.getLogger("alluse.writer")

RECONNECT_INTERVAL_S = 0.5
# Committed account rows the writer keeps (it is the only writer, so they stay true).
CACHE_ACCOUNTS_MAX = 200_000


@dataclass(slots=True, eq=False)
class WriteOp:
    """One operation's writes. `done(result, error)` runs on the writer's loop after the
    batch commits (or fails); `render` builds the result from the committed legs."""

    op_id: int
    accounts: tuple[str, ...]
    done: Callable[[Any, BaseException | None], None]
    render: Callable[[list[Transaction], dict[str, Account]], Any]
    events: tuple[Event, ...] = ()
    creates: tuple[Account, ...] = ()
    idempotency: tuple[str, str] | None = None
    # The audit record to commit with the operation (None: nothing to record).
    audit: "AuditEntry | None" = None
    # API tokens created and revoked (token id, revoked at) by the operation.
    tokens: tuple = ()
    revocations: tuple[tuple[str, Any], ...] = ()


@dataclass(slots=True, eq=False)
class AuditEntry:
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


@dataclass(slots=True)
class Resolution:
    """What the writer tells an account's actor after a batch: which of its operations
    committed (with the committed state) and which failed."""

    committed_op_ids: list[int] = field(default_factory=list)
    failed_op_ids: list[int] = field(default_factory=list)
    state: Account | None = None


class Writer:
    def __init__(self, store: Store, *, batch_size_max: int, queue_max: int,
                 notify: Callable[[dict[str, Resolution]], None], metrics=None, batch_wait_s: float = 0.0,
                 on_commit: Callable[[], None] | None = None):
        self.store = store
        self.batch_size_max = batch_size_max
        self.batch_wait_s = batch_wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.queue_max = queue_max
        self.notify = notify
        self.on_commit = on_commit
        self.metrics = metrics
        self.poisoned: set[str] = set()
        self.cache: OrderedDict[str, Account] = OrderedDict()
        self._inbox: collections.deque = collections.deque()
        self._wakeup_pending = False
        self.connection = None
        self.healthy = False
        self._last_connect_attempt = 0.0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock = asyncio.Lock()
        self.batches = 0
        self.operations = 0
        # The audit chain's head (last sequence number and hash); None = read it again
        # before the next batch (after a write whose outcome is unknown).
        self._audit_head: tuple[int, str] | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.ensure_connection()
        self._task = asyncio.create_task(self._run(), name="alluse-writer")

    async def stop(self) -> None:
        """Flushes what is queued, then stops."""
        if self._task is not None:
            await self.queue.put(None)
            await self._task
            self._task = None
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    # -- submission (any thread) -----------------------------------------------------
    def submit(self, op: WriteOp | ReloadOp) -> None:
        """Thread-safe: hands `op` to the writer's loop. Ops from actor threads gather in a
        deque; one loop wake-up moves all that arrived meanwhile (each wake-up costs a
        write to the loop's self-pipe)."""
        self._inbox.append(op)
        if not self._wakeup_pending:
            self._wakeup_pending = True
            self._loop.call_soon_threadsafe(self._drain_inbox)

    def _drain_inbox(self) -> None:
        self._wakeup_pending = False
        inbox = self._inbox
        while inbox:
            self.enqueue(inbox.popleft())

    def enqueue(self, op: WriteOp | ReloadOp) -> None:
        """On the writer's loop. A full queue refuses at once (bounded memory)."""
        if self.queue.qsize() >= self.queue_max and isinstance(op, WriteOp):
            self._fail([op], Overloaded("the write queue is full", {"queue_max": self.queue_max}))
            return
        self.queue.put_nowait(op)

    # -- the loop --------------------------------------------------------------------
    async def _run(self) -> None:
        """The writer's loop. It must outlive any bug in one batch: an escaped exception
        is logged and the loop goes on (the batch's operations were already failed by
        `_commit`, which catches everything around the statement)."""
        while True:
            try:
                if not await self._run_once():
                    return
            except Exception:  # noqa: BLE001 - keep writing; the cause is in the log
                log.exception("writer loop error; continuing")

    async def _run_once(self) -> bool:
        """Takes one batch (everything queued, up to the limit) and commits it; False once
        the stop marker has been reached."""
        first = await self.queue.get()
        if first is None:
            return False
        if self.batch_wait_s > 0 and self.queue.qsize() < self.batch_size_max:
            await asyncio.sleep(self.batch_wait_s)
        batch: list[WriteOp] = []
        item, stopping = first, False
        while True:
            if item is None:
                stopping = True
            elif isinstance(item, ReloadOp):
                await self._commit(batch)
                batch = []
                await self._reload(item)
            else:
                batch.append(item)
            if stopping or len(batch) >= self.batch_size_max or self.queue.empty():
                break
            item = self.queue.get_nowait()
        await self._commit(batch)
        return not stopping

    async def ensure_connection(self) -> bool:
        async with self._connect_lock:
            return await self._connect_if_needed()

    async def _connect_if_needed(self) -> bool:
        if self.connection is not None and not self.connection.is_closed():
            return True
        now = time.monotonic()
        if now - self._last_connect_attempt < RECONNECT_INTERVAL_S:
            return False
        self._last_connect_attempt = now
        try:
            self.connection = await asyncio.wait_for(self.store.connect(), timeout=3.0)
            self.healthy = True
            log.info("writer connected")
            return True
        except (EngineError, asyncio.TimeoutError) as error:
            self.connection = None
            self.healthy = False
            log.warning("writer cannot reach the database: %s", error)
            return False

    async def _reload(self, op: ReloadOp) -> None:
        try:
            if not await self.ensure_connection():
                raise DatabaseUnavailable("the database is unavailable")
            async with translated_errors():
                row = await self.connection.fetchrow(sql.SELECT_ACCOUNT, op.account_id)
        except EngineError as error:
            self._drop_connection()
            op.done(None, error)
            return
        self.poisoned.discard(op.account_id)
        state = account_from_row(row) if row else None
        if state is not None:
            self.cache[op.account_id] = state
        else:
            self.cache.pop(op.account_id, None)
        op.done(state, None)

    def _drop_connection(self) -> None:
        self._audit_head = None
        if self.connection is not None:
            self.connection.terminate()
            self.connection = None
        self.healthy = False

    # -- one batch -------------------------------------------------------------------
    async def _commit(self, batch: list[WriteOp]) -> None:
        if not batch:
            return
        ready, blocked = [], []
        for op in batch:
            (blocked if self.poisoned.intersection(op.accounts) else ready).append(op)
        if blocked:
            self._fail(blocked, Unavailable("the account is reloading after a failed write; retry",
                                            code="account_reloading"))
        if not ready:
            return
        if not await self.ensure_connection():
            self._fail(ready, DatabaseUnavailable("the database is unavailable"), poison=True)
            return
        started = time.perf_counter()
        try:
            async with translated_errors(rejections=True):
                applied, refused, states = await self._apply(ready)
        except StatementRejected as rejection:
            # Nothing committed, and the connection is fine. One operation is bad (a bug
            # upstream, since validation should have caught it): commit the others alone.
            self.cache.clear()
            if len(ready) > 1:
                log.warning("batch of %d rejected (%s); committing its operations one by one", len(ready), rejection)
                for op in ready:
                    await self._commit([op])
                return
            log.error("operation %s rejected by the database: %s", ready[0].op_id, rejection)
            self._fail(ready, Unavailable("the database rejected the operation", {"reason": str(rejection)[:200]},
                                          code="write_rejected"), poison=True)
            return
        except EngineError as error:
            log.warning("batch of %d failed: %s (%s)", len(ready), error.message, error.details)
            self.cache.clear()
            self._drop_connection()
            self._fail(ready, error, poison=True)
            return
        except Exception as error:  # a bug: fail the batch, keep the writer alive
            log.exception("batch of %d failed unexpectedly", len(ready))
            self.cache.clear()
            self._drop_connection()
            self._fail(ready, Unavailable("internal error while committing", {"reason": type(error).__name__}),
                       poison=True)
            return
        elapsed = time.perf_counter() - started
        self.batches += 1
        self.operations += len(applied)
        if self.metrics is not None:
            self.metrics.observe_batch(len(ready), elapsed)
            rows = self._last_rows
            self.metrics.forks.inc(sum(1 for p in rows.portfolios if p.is_unit))
            self.metrics.merges.inc(len(rows.merged))
        self._fail([op for op, _ in refused], None, poison=True, errors=[e for _, e in refused])
        self._succeed(applied, states)

    async def _apply(self, ops: list[WriteOp]):
        """Reads the committed rows it does not have cached, applies each op in order to
        them, and writes the batch as one statement."""
        states = await self._committed_states(ops)
        before_versions = {account_id: s.version for account_id, s in states.items()}
        rows = BatchRows()
        merging: set[str] = set()
        applied, refused = [], []
        for op in ops:
            if self.poisoned.intersection(op.accounts):
                refused.append((op, Unavailable("the account is reloading; retry", code="account_reloading")))
                continue
            saved = {account_id: states.get(account_id) for account_id in _touched_ids(op)}
            mark, merging_before = rows.mark(), set(merging)
            try:
                transactions = apply_op(op, states, merging, rows)
            except (AssertionError, EngineError, KeyError) as error:
                log.error("op %s refused at commit: %r", op.op_id, error)
                for account_id, state in saved.items():
                    if state is None:
                        states.pop(account_id, None)
                    else:
                        states[account_id] = state
                rows.rollback(mark)
                merging = merging_before
                self.poisoned.update(op.accounts)
                refused.append((op, Unavailable("the operation conflicted at commit; retry",
                                                {"reason": type(error).__name__}, code="commit_conflict")))
                continue
            result = op.render(transactions, states)
            if op.idempotency:
                rows.keys.append((op.idempotency[0], op.idempotency[1], encode_json(result)))
            applied.append((op, result))
        head = await self._chain_audit(applied, rows)
        await write_batch(self.connection, states, before_versions, rows)
        self._audit_head = head
        for op, _ in applied:
            if op.audit is not None:
                op.audit.context.recorded = True
        self._last_rows = rows
        for account_id, state in states.items():
            self.cache[account_id] = state
            self.cache.move_to_end(account_id)
        while len(self.cache) > CACHE_ACCOUNTS_MAX:
            self.cache.popitem(last=False)
        return applied, refused, states

    async def _chain_audit(self, applied, rows: BatchRows) -> tuple[int, str] | None:
        """Links an audit record for every applied operation that carries one, in commit
        order, after the chain's head; returns the new head (kept once the batch commits)."""
        if not any(op.audit is not None for op, _ in applied):
            return self._audit_head
        if self._audit_head is None:
            row = await self.connection.fetchrow(sql.SELECT_AUDIT_HEAD)
            self._audit_head = (row["seq"], row["hash"]) if row else (0, audit.GENESIS_HASH)
        seq, prev_hash = self._audit_head
        now = datetime.now(timezone.utc)
        for op, result in applied:
            entry = op.audit
            if entry is None:
                continue
            context = entry.context
            details = dict(entry.details or {})
            result_id = getattr(result, "id", None)
            if isinstance(result_id, str):
                details["result_id"] = result_id
            if context.reason is not None:
                details["reason"] = context.reason
            seq += 1
            record = audit.new_record(seq=seq, at=now, principal=context.principal, action=entry.action,
                                      target=entry.target, request_id=context.request_id, client=context.client,
                                      outcome=entry.outcome, details=details, prev_hash=prev_hash)
            rows.audit.append(record)
            prev_hash = record.hash
        return seq, prev_hash

    async def _committed_states(self, ops: list[WriteOp]) -> dict[str, Account]:
        """The committed state of every existing account the batch touches. The writer
        is the only writer, so its cache of rows it read or wrote is the committed state;
        a failed batch clears it, and the version guard in the batch statement catches
        any writer that should not exist."""
        created = {account.id for op in ops for account in _created_accounts(op)}
        states: dict[str, Account] = {}
        missing: list[str] = []
        for op in ops:
            for account_id in _touched_ids(op):
                if account_id in states or account_id in created:
                    continue
                cached = self.cache.get(account_id)
                if cached is None:
                    missing.append(account_id)
                else:
                    states[account_id] = cached
        if missing:
            fetched = await self.connection.fetch(sql.SELECT_ACCOUNTS, list(dict.fromkeys(missing)))
            for row in fetched:
                states[row["id"]] = account_from_row(row)
        return states

    def _succeed(self, applied, states: dict[str, Account]) -> None:
        """Actors learn first (one message per account per batch, carrying the state the
        whole batch left), callers second: a caller that reads after its reply is queued
        behind the news in the account's mailbox."""
        resolutions: dict[str, Resolution] = defaultdict(Resolution)
        for op, _ in applied:
            for account_id in op.accounts:
                resolution = resolutions[account_id]
                resolution.committed_op_ids.append(op.op_id)
                resolution.state = states[account_id]
        if resolutions:
            self.notify(resolutions)
        if applied and self.on_commit is not None:
            self.on_commit()
        for op, result in applied:
            op.done(result, None)

    def _fail(self, ops: list[WriteOp], error: BaseException | None, *, poison: bool = False,
              errors: list[BaseException] | None = None) -> None:
        if not ops:
            return
        resolutions: dict[str, Resolution] = defaultdict(Resolution)
        for op in ops:
            for account_id in op.accounts:
                resolutions[account_id].failed_op_ids.append(op.op_id)
                if poison:
                    self.poisoned.add(account_id)
        self.notify(resolutions)
        for index, op in enumerate(ops):
            op.done(None, errors[index] if errors else error)


def _created_accounts(op: WriteOp) -> list[Account]:
    created = list(op.creates)
    for event in op.events:
        if isinstance(event, PortfolioOpened):
            created.extend(event.accounts)
    return created


def _touched_ids(op: WriteOp) -> set[str]:
    ids = set(op.accounts)
    ids.update(event.account_id for event in op.events if event.account_id is not None)
    ids.update(account.id for account in _created_accounts(op))
    return ids
