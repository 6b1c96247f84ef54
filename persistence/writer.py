"""The persistence actor: the one writer. An asyncio task fed through a bounded queue;
it takes every operation waiting (up to `batch_size_max`), applies them in arrival order
to the committed account rows with the core's own `mutate` (a last safety check: a leg
that would overdraw is a bug upstream and fails alone), and commits the whole batch as
one PostgreSQL transaction. Replies go out only after COMMIT returns.

Pipelined, on one connection: while batch N's statement runs, the writer applies the
operations arriving meanwhile to batch N+1 (on top of the states N leaves), so N+1 is
sent the moment N returns. Statements never overlap, so batches commit strictly in
order (the audit chain is the commit order); if N fails, N+1 is rebuilt from what did
commit before it is sent.

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
from engine.errors import DatabaseUnavailable, EngineError, KeyCommitted, Overloaded, Unavailable
from engine.model import Account, Event, LegPosted, PortfolioOpened, Transaction
from persistence import store as sql
from persistence.batch import BatchRows, KeyRow, apply_op, encode_json, write_batch_args
from persistence.store import KeyConflict, StatementRejected, Store, account_from_row, translated_errors

log = logging.getLogger("alluse.writer")

RECONNECT_INTERVAL_S = 0.5
# Expired idempotency keys deleted per statement, and statements per purge (the rest
# waits for the next purge, so one purge never holds the writer for long).
PURGE_CHUNK_ROWS = 5_000
PURGE_CHUNKS_MAX = 20
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


@dataclass(slots=True, eq=False)
class PurgeKeysOp:
    """Delete idempotency keys older than `retention_s` (by the database's clock), in
    bounded chunks, between batches; `done(count, error)`."""

    retention_s: float
    done: Callable[[int, BaseException | None], None]


@dataclass(slots=True)
class Resolution:
    """What the writer tells an account's actor after a batch: which of its operations
    committed (with the committed state) and which failed."""

    committed_op_ids: list[int] = field(default_factory=list)
    failed_op_ids: list[int] = field(default_factory=list)
    # Operations that did not run (their idempotency key had committed before): the
    # actor forgets them; its committed state is not in doubt.
    dropped_op_ids: list[int] = field(default_factory=list)
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
        # Pipelining: operations taken but not yet applied, the batch being built, the
        # statement in flight, and what that statement leaves (states, audit head) for the
        # batch built on top of it. A failed statement bumps the epoch: batches built on
        # what it would have written are rebuilt before they are sent.
        self._waiting: list[WriteOp] = []
        self._builder: _Batch | None = None
        self._inflight: asyncio.Future | None = None
        self._epoch = 0
        self._spec_states: dict[str, Account] = {}
        self._spec_head: tuple[int, str] | None = None

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
        """Hands `op` to the writer: at once from the writer's loop (where the actors run),
        thread-safe from anywhere else. Ops from other threads gather in a deque; one loop
        wake-up moves all that arrived meanwhile (each wake-up costs a write to the
        loop's self-pipe)."""
        if asyncio._get_running_loop() is self._loop:
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

    def enqueue(self, op: WriteOp | ReloadOp) -> None:
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
                self._abandon(Unavailable("internal error in the writer; retry", code="write_failed"))

    async def _run_once(self) -> bool:
        """Takes everything queued; applies it to the next batch while the previous one's
        statement runs (pipelining: the next batch is ready the moment the previous
        commit returns), and sends the next batch once nothing is in flight. False once
        the stop marker has been reached."""
        item = await self.queue.get()
        if self.batch_wait_s > 0 and self._inflight is None and self._builder is None \
                and self.queue.qsize() < self.batch_size_max:
            await asyncio.sleep(self.batch_wait_s)
        items = [item]
        queue = self.queue
        while not queue.empty():
            items.append(queue.get_nowait())
        stopping = False
        for item in items:
            if item is _WAKE:
                continue
            if item is None:
                stopping = True
            elif isinstance(item, ReloadOp):
                # Behind every earlier write: flush them (and wait for their commit) first.
                await self._flush()
                await self._reload(item)
            elif isinstance(item, PurgeKeysOp):
                await self._flush()
                await self._purge_keys(item)
            else:
                self._waiting.append(item)
        await self._advance()
        if stopping:
            await self._flush()
        return not stopping

    async def _advance(self) -> None:
        """Applies waiting operations to the batch being built (up to the batch size) and
        sends it whenever no statement is in flight."""
        while True:
            if self._waiting and (self._builder is None or len(self._builder.ops) < self.batch_size_max):
                await self._build()
                continue
            if self._inflight is None and self._builder is not None:
                self._send(await self._current_builder())
                continue
            return

    async def _flush(self) -> None:
        """Sends everything taken so far and waits until it has committed (or failed)."""
        while True:
            if self._inflight is not None:
                await self._inflight
                continue
            if self._waiting or self._builder is not None:
                await self._advance()
                continue
            return

    def _abandon(self, error: BaseException) -> None:
        """After a bug in the loop: fail what was taken but not sent."""
        ops = list(self._waiting)
        self._waiting.clear()
        if self._builder is not None:
            ops.extend(self._builder.ops)
            self._builder = None
        self._fail(ops, error, poison=True)

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

    async def _purge_keys(self, op: PurgeKeysOp) -> None:
        total = 0
        try:
            if not await self.ensure_connection():
                raise DatabaseUnavailable("the database is unavailable")
            cutoff = await self.connection.fetchval("SELECT now() - make_interval(secs => $1)", op.retention_s)
            for _ in range(PURGE_CHUNKS_MAX):
                async with translated_errors():
                    status = await self.connection.execute(sql.PURGE_IDEMPOTENCY, cutoff, PURGE_CHUNK_ROWS)
                deleted = int(status.rsplit(" ", 1)[-1])
                total += deleted
                if deleted < PURGE_CHUNK_ROWS:
                    break
        except EngineError as error:
            self._drop_connection()
            op.done(total, error)
            return
        op.done(total, None)

    def _drop_connection(self) -> None:
        self._audit_head = None
        if self.connection is not None:
            self.connection.terminate()
            self.connection = None
        self.healthy = False

    # -- building a batch ------------------------------------------------------------
    def _invalidate(self) -> None:
        """A statement failed: nothing built on what it would have written holds."""
        self._epoch += 1
        self.cache.clear()
        self._spec_states = {}
        self._spec_head = None

    def _new_batch(self) -> "_Batch":
        """A batch to build on top of the one in flight (if any): its states and audit
        head are where the in-flight batch leaves them."""
        if self._inflight is not None:
            head = self._spec_head
        else:
            head = self._audit_head
        return _Batch(epoch=self._epoch, head=head)

    async def _current_builder(self) -> "_Batch":
        """The batch being built, rebuilt from scratch if a statement failed since it
        started (it was built on states that did not survive)."""
        batch = self._builder
        self._builder = None
        if batch.epoch != self._epoch:
            rebuilt = self._new_batch()
            await self._apply_ops(rebuilt, batch.ops)
            batch = rebuilt
        return batch

    async def _build(self) -> None:
        if self._builder is None:
            self._builder = self._new_batch()
        builder = self._builder
        room = self.batch_size_max - len(builder.ops)
        chunk = self._waiting[:room]
        del self._waiting[:room]
        await self._apply_ops(builder, chunk)

    async def _apply_ops(self, batch: "_Batch", ops: list[WriteOp]) -> None:
        """Applies `ops` in order to the batch (the core's `mutate` on the committed rows,
        a last safety check) and collects their rows. Ops on poisoned accounts fail at
        once; a driver failure while reading rows fails the whole batch."""
        poisoned = self.poisoned
        ready, blocked = [], []
        for op in ops:
            (blocked if poisoned and not poisoned.isdisjoint(op.accounts) else ready).append(op)
        if blocked:
            self._fail(blocked, Unavailable("the account is reloading after a failed write; retry",
                                            code="account_reloading"))
        if not ready:
            return
        try:
            async with translated_errors():
                await self._apply_into(batch, ready)
        except EngineError as error:
            log.warning("reading rows for a batch failed: %s", error.message)
            if self._builder is batch:
                self._builder = None
            self._invalidate()
            self._drop_connection()
            taken = {id(op) for op in batch.ops}
            self._fail(batch.ops + [op for op in ready if id(op) not in taken], error, poison=True)
            batch.ops, batch.applied, batch.refused = [], [], []

    async def _apply_into(self, batch: "_Batch", ops: list[WriteOp]) -> None:
        if batch.epoch == self._epoch:
            touched = [_touched_ids(op) for op in ops]
            await self._load_states(batch, ops, touched)
        if batch.epoch != self._epoch:
            batch.ops.extend(ops)  # built on states that did not survive: rebuilt before it is sent
            return
        poisoned = self.poisoned
        states, rows = batch.states, batch.rows
        applied_from = len(batch.applied)
        for op, ids in zip(ops, touched):
            batch.ops.append(op)
            if poisoned and not poisoned.isdisjoint(op.accounts):
                batch.refused.append((op, Unavailable("the account is reloading; retry", code="account_reloading")))
                continue
            saved = [(account_id, states.get(account_id)) for account_id in ids]
            mark, merging_before = rows.mark(), (set(batch.merging) if batch.merging else None)
            try:
                transactions = apply_op(op, states, batch.merging, rows)
            except (AssertionError, EngineError, KeyError) as error:
                log.error("op %s refused at commit: %r", op.op_id, error)
                for account_id, state in saved:
                    if state is None:
                        states.pop(account_id, None)
                    else:
                        states[account_id] = state
                rows.rollback(mark)
                batch.merging = merging_before if merging_before is not None else set()
                poisoned.update(op.accounts)
                batch.refused.append((op, Unavailable("the operation conflicted at commit; retry",
                                                      {"reason": type(error).__name__}, code="commit_conflict")))
                continue
            result = op.render(transactions, states)
            if op.idempotency:
                rows.keys.append(KeyRow(op.idempotency[0], op.idempotency[1], encode_json(result).decode()))
            batch.applied.append((op, result))
        if any(op.audit is not None for op, _ in batch.applied[applied_from:]):
            if batch.head is None:
                batch.head = await self._read_audit_head()
            batch.head = _chain_audit(batch.applied[applied_from:], rows, batch.head)

    async def _load_states(self, batch: "_Batch", ops: list[WriteOp], touched: list) -> None:
        """The state of every existing account the ops touch, as the batch finds it: the
        in-flight batch's result, else the cache (the writer is the only writer, so rows
        it read or wrote are the committed state; a failed batch clears it), else the
        database. The version guard in the statement catches any writer that should not
        exist."""
        states, before = batch.states, batch.before_versions
        spec, cache = self._spec_states, self.cache
        created = None
        missing: list[str] = []
        for op, ids in zip(ops, touched):
            if op.creates or _opens_portfolio(op):
                created = created or set()
                created.update(account.id for account in _created_accounts(op))
            for account_id in ids:
                if account_id in states or (created is not None and account_id in created):
                    continue
                state = spec.get(account_id)
                if state is None:
                    state = cache.get(account_id)
                if state is None:
                    missing.append(account_id)
                else:
                    states[account_id] = state
                    before[account_id] = state.version
        if missing:
            await self._settle_inflight()
            if batch.epoch != self._epoch:
                return  # it will be rebuilt before it is sent
            if not await self.ensure_connection():
                raise DatabaseUnavailable("the database is unavailable")
            for row in await self.connection.fetch(sql.SELECT_ACCOUNTS, list(dict.fromkeys(missing))):
                state = account_from_row(row)
                if row["id"] not in states:
                    states[row["id"]] = state
                    before[row["id"]] = state.version

    async def _read_audit_head(self) -> tuple[int, str]:
        await self._settle_inflight()
        if self._audit_head is None:
            if not await self.ensure_connection():
                raise DatabaseUnavailable("the database is unavailable")
            row = await self.connection.fetchrow(sql.SELECT_AUDIT_HEAD)
            self._audit_head = (row["seq"], row["hash"]) if row else (0, audit.GENESIS_HASH)
        return self._audit_head

    async def _settle_inflight(self) -> None:
        """Waits for the statement in flight (the connection is busy until it returns),
        unless this runs inside it (its one-by-one retry)."""
        task = self._inflight
        if task is not None and task is not asyncio.current_task():
            await task

    # -- committing --------------------------------------------------------------------
    def _send(self, batch: "_Batch") -> None:
        """Starts the batch's statement; the writer goes on building the next batch."""
        if not batch.applied:
            self._fail([op for op, _ in batch.refused], None, poison=True, errors=[e for _, e in batch.refused])
            return
        self._spec_states = batch.states
        self._spec_head = batch.head
        self._inflight = asyncio.ensure_future(self._commit_in_flight(batch))

    async def _commit_in_flight(self, batch: "_Batch") -> None:
        try:
            await self._execute(batch)
        finally:
            self._inflight = None
            self._spec_states = {}
            self._spec_head = None
            self.queue.put_nowait(_WAKE)

    async def _commit(self, ops: list[WriteOp], *, replaying: bool = False) -> None:
        """Builds and commits `ops` now, as one batch, with nothing else in flight (the
        one-by-one retry after a rejected statement, the rest of a batch that held a
        committed idempotency key)."""
        batch = _Batch(epoch=self._epoch, head=self._audit_head)
        await self._apply_ops(batch, ops)
        if not batch.applied:
            self._fail([op for op, _ in batch.refused], None, poison=True, errors=[e for _, e in batch.refused])
            return
        await self._execute(batch, replaying=replaying)

    async def _replay_committed_keys(self, ops: list[WriteOp]) -> None:
        """The batch held idempotency keys that had committed before (a retry after the
        first attempt's reply was lost, or after a restart): nothing of it committed.
        Those operations are answered with their stored result and their accounts reload
        (their actors counted them in); the others commit as one batch again."""
        self._invalidate()
        keys = [op.idempotency[0] for op in ops if op.idempotency]
        try:
            async with translated_errors():
                rows = await self.connection.fetch(sql.SELECT_IDEMPOTENCY_MANY, keys)
        except EngineError as error:
            self._drop_connection()
            self._fail(ops, error, poison=True)
            return
        stored = {row["key"]: KeyCommitted(row["fingerprint"], bytes(row["response"])) for row in rows}
        replayed = [op for op in ops if op.idempotency and op.idempotency[0] in stored]
        others = [op for op in ops if not (op.idempotency and op.idempotency[0] in stored)]
        self._fail(replayed, None, dropped=True, errors=[stored[op.idempotency[0]] for op in replayed])
        if others:
            await self._commit(others, replaying=True)

    async def _execute(self, batch: "_Batch", *, replaying: bool = False) -> None:
        ready = [op for op, _ in batch.applied] + [op for op, _ in batch.refused]
        started = time.perf_counter()
        try:
            args = write_batch_args(batch.states, batch.before_versions, batch.rows)
            if not await self.ensure_connection():
                raise DatabaseUnavailable("the database is unavailable")
            async with translated_errors(rejections=True):
                await self.connection.fetchval(sql.WRITE_BATCH, *args)
        except KeyConflict as conflict:
            if not replaying:
                await self._replay_committed_keys(ready)
                return
            # Two operations of one batch with one key: the engine's in-flight table
            # should make that impossible.
            log.error("batch of %d repeats an idempotency key: %s", len(ready), conflict)
            self._invalidate()
            self._fail(ready, Unavailable("the database rejected the operation", code="write_rejected"),
                       poison=True)
            return
        except StatementRejected as rejection:
            # Nothing committed, and the connection is fine. One operation is bad (a bug
            # upstream, since validation should have caught it): commit the others alone.
            self._invalidate()
            if len(ready) > 1:
                log.warning("batch of %d rejected (%s); committing its operations one by one", len(ready), rejection)
                for op in ready:
                    await self._commit([op])
                self._epoch += 1  # a batch built meanwhile may predate some of these commits
                return
            log.error("operation %s rejected by the database: %s", ready[0].op_id, rejection)
            self._fail(ready, Unavailable("the database rejected the operation", {"reason": str(rejection)[:200]},
                                          code="write_rejected"), poison=True)
            return
        except EngineError as error:
            log.warning("batch of %d failed: %s (%s)", len(ready), error.message, error.details)
            self._invalidate()
            self._drop_connection()
            self._fail(ready, error, poison=True)
            return
        except Exception as error:  # a bug: fail the batch, keep the writer alive
            log.exception("batch of %d failed unexpectedly", len(ready))
            self._invalidate()
            self._drop_connection()
            self._fail(ready, Unavailable("internal error while committing", {"reason": type(error).__name__}),
                       poison=True)
            return
        elapsed = time.perf_counter() - started
        applied, states, rows = batch.applied, batch.states, batch.rows
        if batch.head is not None:
            self._audit_head = batch.head
        for op, _ in applied:
            if op.audit is not None:
                op.audit.context.recorded = True
        cache = self.cache
        for account_id, state in states.items():
            cache[account_id] = state
            cache.move_to_end(account_id)
        while len(cache) > CACHE_ACCOUNTS_MAX:
            cache.popitem(last=False)
        self.batches += 1
        self.operations += len(applied)
        if self.metrics is not None:
            self.metrics.observe_batch(len(ready), elapsed)
            if rows.portfolios:
                self.metrics.forks.inc(sum(1 for p in rows.portfolios if p.is_unit))
            if rows.merged:
                self.metrics.merges.inc(len(rows.merged))
        if batch.refused:
            self._fail([op for op, _ in batch.refused], None, poison=True, errors=[e for _, e in batch.refused])
        self._succeed(applied, states)

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
              errors: list[BaseException] | None = None, dropped: bool = False) -> None:
        if not ops:
            return
        resolutions: dict[str, Resolution] = defaultdict(Resolution)
        for op in ops:
            for account_id in op.accounts:
                resolution = resolutions[account_id]
                (resolution.dropped_op_ids if dropped else resolution.failed_op_ids).append(op.op_id)
                if poison:
                    self.poisoned.add(account_id)
        self.notify(resolutions)
        for index, op in enumerate(ops):
            op.done(None, errors[index] if errors else error)




# Put in the queue when a statement returns, to wake the loop for the next batch.
_WAKE = object()


@dataclass(slots=True, eq=False)
class _Batch:
    """One batch, being built or committed: its operations in order, the account states
    as the batch leaves them (and the versions it found), its rows and audit head."""

    epoch: int
    head: tuple[int, str] | None
    ops: list = field(default_factory=list)
    states: dict = field(default_factory=dict)
    before_versions: dict = field(default_factory=dict)
    rows: BatchRows = field(default_factory=BatchRows)
    merging: set = field(default_factory=set)
    applied: list = field(default_factory=list)
    refused: list = field(default_factory=list)


def _chain_audit(applied, rows: BatchRows, head: tuple[int, str]) -> tuple[int, str]:
    """Links an audit record for every applied operation that carries one, in commit
    order, after the chain's head; returns the new head (kept once the batch commits)."""
    seq, prev_hash = head
    now = datetime.now(timezone.utc)
    for op, result in applied:
        entry = op.audit
        if entry is None:
            continue
        context = entry.context
        details = dict(entry.details) if entry.details else {}
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


def _opens_portfolio(op: WriteOp) -> bool:
    for event in op.events:
        if type(event) is PortfolioOpened:
            return True
    return False


def _created_accounts(op: WriteOp) -> list[Account]:
    created = list(op.creates)
    for event in op.events:
        if isinstance(event, PortfolioOpened):
            created.extend(event.accounts)
    return created


def _touched_ids(op: WriteOp) -> list[str]:
    """Every account the op reads or writes, once each, in a stable order."""
    ids = dict.fromkeys(op.accounts)
    for event in op.events:
        kind = type(event)
        if kind is LegPosted:
            ids[event.leg.account_id] = None
        elif kind is PortfolioOpened:
            for account in event.accounts:
                ids[account.id] = None
        elif event.account_id is not None:
            ids[event.account_id] = None
    for account in op.creates:
        ids[account.id] = None
    return list(ids)
