"""The engine supervises its database like any other child (issue 14).

One asyncio task on the engine's loop looks at the database every `TICK_S`: is the
embedded postmaster alive, is there room on its disk, does the server answer a probe on
a connection of its own. From that it keeps one state:

    starting -> available <-> database_unavailable | storage_full
    starting -> standby -> available          (ALLUSE_STANDBY=1: another engine writes)
    available -> not_primary -> available     (another engine took the writer lock)

- *database_unavailable*: the embedded postmaster is gone (restarted with backoff, its
  crash recovery waited for), or the server stopped answering (hung, or unreachable with
  DATABASE_URL). The writer is paused: its connection is dropped, so a statement in
  flight fails at once instead of after the command timeout (its outcome is unknown:
  nothing was acknowledged, its accounts reload), and writes are refused at once with
  503 `database_unavailable` until the server answers again.
- *storage_full*: the embedded server's file system has less than
  `database.storage_free_min_mb` free (checked before PostgreSQL runs out and PANICs), or
  a write failed with `disk_full` (DATABASE_URL). Writes get 503 `storage_full`; when
  space returns the engine starts the server again if it stopped, and resumes.
- *not_primary*: this engine lost the writer lock (its connection dropped and another
  engine took the lock). It stops writing at once and never acknowledges anything it did
  not commit (every commit happens on the connection that holds the lock), refuses
  every request (its memory is no longer the truth) and waits as a standby.

Coming back, before the writer's new connection is used (`on_connect`), every cached
head is read again from committed data: the audit chain's head (the writer forgets it
with the connection), the resident accounts (idle ones are passivated and load again on
use; those with writes in flight reload when those fail), the recently committed
idempotency keys, the API tokens, the drawdown flags and the portfolio cache; the
webhook worker restarts from its persisted cursors.

/ready says "writes can commit" (available, and the server answered within
`READY_ANSWER_AGE_MAX_S`), from this state, without a query: it answers at once
whatever the database does. /health says "the process can serve": it fails only when the
supervisor or the writer task has died.

While the database is away, a line is logged when the state changes and then once per
`LOG_INTERVAL_S` with what was refused; repeated warnings of the writer and the actors
are folded by `RepeatFilter` into one line per interval with a count."""
from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from actors.account import ReloadIfStale
from actors.runtime import stop_tasks
from engine.errors import DatabaseUnavailable, EngineError, Unavailable
from persistence import fence

if TYPE_CHECKING:
    from actors.api import Engine

log = logging.getLogger("alluse.availability")

TICK_S = 0.25
PROBE_TIMEOUT_S = 1.0
# /ready is 503 once the last answer of the server is older than this.
READY_ANSWER_AGE_MAX_S = 1.5
# /ready must answer within this whatever the database does (issue 14).
READY_WITHIN_S = 2.0
# No answer for this long: the server is hung or unreachable, the writer is paused.
HUNG_AFTER_S = 2.0
RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
STORAGE_FULL_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)
# Writes resume once the free space is this much above the minimum (no flapping).
STORAGE_HYSTERESIS_BYTES = 16 << 20
LOG_INTERVAL_S = 10.0
# Between attempts to reach a server that refuses or is unreachable (doubling from TICK_S).
RECONNECT_BACKOFF_MAX_S = 2.0
DATA_DIRECTORY_POLL_S = 0.05
WRITER_LOCK_POLL_S = 0.2
# A non-standby engine waits this long for the writer lock before it gives up: the
# holder may be the session of an engine that has just died on this very host.
WRITER_LOCK_GRACE_S = 3.0
# With the data directory locked, any holder of the writer lock is a dead engine's
# session: after this long it is terminated.
STALE_HOLDER_S = 5.0

assert READY_ANSWER_AGE_MAX_S + TICK_S < READY_WITHIN_S
assert PROBE_TIMEOUT_S < HUNG_AFTER_S
assert READY_ANSWER_AGE_MAX_S <= HUNG_AFTER_S


class State(enum.Enum):
    STARTING = "starting"
    STANDBY = "standby"
    AVAILABLE = "available"
    DATABASE_UNAVAILABLE = "database_unavailable"
    STORAGE_FULL = "storage_full"
    NOT_PRIMARY = "not_primary"
    STOPPED = "stopped"


class AnotherEngine(Exception):
    """Another engine holds the data directory or the writer lock, and this one is not a
    standby: it must not start (the service exits with one line and code 2)."""


def _unavailable(reason: str) -> DatabaseUnavailable:
    return DatabaseUnavailable("the database is unavailable; the engine is bringing it back; retry",
                               {"reason": reason})


def _storage_full() -> DatabaseUnavailable:
    return DatabaseUnavailable("the database's disk is full; writes resume by themselves once space is freed",
                               {"reason": "storage_full"}, code="storage_full")


def _not_primary() -> Unavailable:
    return Unavailable("another engine is the writer now; this one waits as a standby",
                       {"reason": "not_primary"}, code="not_primary")


def _standby() -> Unavailable:
    return Unavailable("this engine is a standby: another engine writes; it takes over when that one stops",
                       {"reason": "standby"}, code="standby")


def _starting() -> Unavailable:
    return Unavailable("the engine is starting", {"reason": "starting"}, code="not_ready")


def _stopping() -> Unavailable:
    return Unavailable("the engine is stopping", {"reason": "stopping"}, code="not_ready")


_REFUSALS = {State.STARTING: _starting, State.STANDBY: _standby, State.NOT_PRIMARY: _not_primary,
             State.STOPPED: _stopping}


class Availability:
    """The database supervisor of one engine, and the fence that keeps it the only
    writer. The engine calls `claim_data_directory`, `fence`, `attach`, `start` as it
    starts and `stop`, `release` as it stops."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.state = State.STARTING
        self.reason = "starting"
        # Set when this engine must answer no request but /health and /ready: it is a
        # standby, starting, or no longer the writer (kept with the state: the gateway
        # reads it on every request).
        self.refusal: EngineError | None = _starting()
        self.standby = engine.settings.engine.standby
        self.data_directory = fence.DataDirectoryLock(engine.settings.database.data_dir)
        self.writer_name = fence.writer_name(engine.settings.server.port)
        self.last_answer = 0.0
        self.outage_started: float | None = None
        self.restarts = 0                 # embedded server restarts done (a metric)
        self.outages = 0
        self.last_recovery_s: float | None = None
        self._restart_attempts = 0
        self._next_restart_at = 0.0
        self._disk_full_until = 0.0
        self._disk_full_failures = 0
        self._batches_at_resume = 0
        self._refused = 0
        self._refused_logged = 0
        self._last_log = 0.0
        self._lost_lock = False
        self._connected_once = False
        self._probe_connection = None
        self._connect_failures = 0
        self._next_connect_at = 0.0
        self._probe_refused = False
        self._last_probe_refused = False
        self._task: asyncio.Task | None = None
        self._writer = None

    # -- what the gateway and the engine ask ------------------------------------------
    def _set_state(self, state: State, reason: str) -> None:
        self.state, self.reason = state, reason
        self.refusal = _REFUSALS[state]() if state in _REFUSALS else None

    @property
    def write_refusal(self) -> EngineError | None:
        """Set while writes cannot commit: the error to answer them with at once."""
        writer = self._writer
        return writer.refusal if writer is not None else _starting()

    def count_refusal(self) -> None:
        """A write refused at the door (the gateway's), for the outage's log line."""
        self._refused += 1

    def writable(self) -> bool:
        """Readiness: writes can commit now."""
        writer = self._writer
        if self.state is not State.AVAILABLE or writer is None or writer.refusal is not None or not writer.healthy:
            return False
        return time.monotonic() - self.last_answer <= READY_ANSWER_AGE_MAX_S

    def alive(self) -> bool:
        """Liveness: the supervisor and the writer still run (both recover everything
        else by themselves)."""
        for task in (self._task, getattr(self._writer, "_task", None)):
            if task is not None and task.done():
                return False
        return True

    def describe(self) -> dict[str, Any]:
        reason = self.reason
        if self.state is State.AVAILABLE and not self.writable():
            # Between the first failed write or missed probe and the state's change.
            writer = self._writer
            reason = ("writer_reconnecting" if writer is None or writer.refusal is not None or not writer.healthy
                      else "no_recent_answer")
        return {"state": self.state.value, "reason": reason,
                "outage_s": round(time.monotonic() - self.outage_started, 1) if self.outage_started else 0.0,
                "database_restarts": self.restarts, "last_recovery_s": self.last_recovery_s}

    # -- starting: the fence ------------------------------------------------------------
    async def claim_data_directory(self) -> None:
        """Embedded server only: the data directory's lock, before the server is started
        or adopted. A standby waits for it; any other engine gives up (`AnotherEngine`)."""
        lock = self.data_directory
        description = (f"engine pid {os.getpid()} on {socket.gethostname()}, port "
                       f"{self.engine.settings.server.port}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        if lock.try_acquire(description):
            return
        if not self.standby:
            raise AnotherEngine(f"another engine runs on data directory {lock.path.parent} ({lock.holder()}); "
                                f"not starting (ALLUSE_STANDBY=1 waits as a standby instead)")
        self._enter_standby(f"data directory {lock.path.parent} is held by {lock.holder()}")
        while not lock.try_acquire(description):
            await asyncio.sleep(DATA_DIRECTORY_POLL_S)
        log.warning("standby: the data directory is free; taking over")

    async def fence(self):
        """A new writer connection holding the writer lock (to hand to the writer). A
        standby waits for the lock; another engine waits `WRITER_LOCK_GRACE_S` and then
        gives up; with the data directory locked the holder can only be a dead engine's
        session, which is waited for and, after `STALE_HOLDER_S`, terminated."""
        store, loop = self.engine.store, asyncio.get_running_loop()
        started, connection = loop.time(), None
        try:
            while True:
                if connection is None or connection.is_closed():
                    connection = await store.connect()
                if await fence.take_writer_lock(connection, self.writer_name):
                    result, connection = connection, None
                    self._connected_once = True
                    return result
                holder = await fence.writer_lock_holder(connection)
                waited = loop.time() - started
                if self.data_directory.held:
                    if waited >= STALE_HOLDER_S:
                        log.warning("terminating the writer session of a dead engine: %s", holder)
                        await connection.execute(
                            "SELECT pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' "
                            "AND l.classid = 0 AND l.objid = $1 AND l.objsubid = 1 AND l.pid <> pg_backend_pid()",
                            fence.WRITER_LOCK_KEY)
                elif not self.standby and waited >= WRITER_LOCK_GRACE_S:
                    raise AnotherEngine(f"another engine writes to this database: {holder}; not starting "
                                        f"(ALLUSE_STANDBY=1 waits as a standby instead)")
                elif self.standby and self.state is not State.STANDBY:
                    self._enter_standby(f"the writer lock is held by {holder}")
                await asyncio.sleep(WRITER_LOCK_POLL_S)
        finally:
            if connection is not None:
                connection.terminate()

    def _enter_standby(self, why: str) -> None:
        self._set_state(State.STANDBY, why)
        log.warning("standby: %s; this engine serves /health and /ready (503) and takes over when it is free", why)

    def attach(self, writer, connection) -> None:
        """Hands the fenced connection to the writer and hooks the supervisor in."""
        self._writer = writer
        writer.adopt(connection)
        writer.on_connect = self._on_writer_connect
        writer.on_error = self._on_writer_error

    def start(self) -> None:
        self._set_state(State.AVAILABLE, "ready")
        self.last_answer = time.monotonic()
        self._batches_at_resume = self._writer.batches
        RepeatFilter.install()
        self._task = asyncio.create_task(self._run(), name="alluse-availability")

    async def stop(self) -> None:
        self._set_state(State.STOPPED, "stopping")
        if self._task is not None:
            await stop_tasks([self._task], "the database supervisor", log)
            self._task = None
        if self._probe_connection is not None:
            self._probe_connection.terminate()
            self._probe_connection = None

    def release(self) -> None:
        """The data directory's lock goes last, once the server has stopped."""
        self.data_directory.release()

    # -- the writer's hooks -------------------------------------------------------------
    async def _on_writer_connect(self, connection) -> None:
        """Every new writer connection: take the writer lock on it (or stop writing), then
        re-read every cached head before it is used."""
        try:
            locked = await fence.take_writer_lock(connection, self.writer_name)
        except Exception as error:  # noqa: BLE001 - a driver error: just not connected
            raise _unavailable(type(error).__name__) from error
        if not locked:
            self._lost_lock = True
            self._writer.refusal = _not_primary()
            raise _not_primary()
        if self._connected_once:
            await self._resync()
        self._connected_once = True

    def _on_writer_error(self, error: EngineError, operations: int) -> None:
        self._refused += operations
        if error.details.get("reason") == "DiskFullError":
            delay = STORAGE_FULL_BACKOFF_S[min(self._disk_full_failures, len(STORAGE_FULL_BACKOFF_S) - 1)]
            self._disk_full_failures += 1
            self._disk_full_until = time.monotonic() + delay

    # -- the supervisor -----------------------------------------------------------------
    async def _run(self) -> None:
        # Ends on STOPPED as well as on cancellation: Python 3.11's `asyncio.wait_for`
        # can swallow a cancellation that arrives as its inner wait completes, and a
        # `while True` supervisor then ticked on forever while `stop()` waited for it.
        while self.state is not State.STOPPED:
            await asyncio.sleep(TICK_S)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the supervisor must outlive its own bugs
                log.exception("database supervisor tick failed; continuing")

    async def _tick(self) -> None:
        if self._lost_lock and self.state is not State.NOT_PRIMARY:
            await self._demote()
        if self.state is State.NOT_PRIMARY:
            await self._try_take_over()
            return
        now = time.monotonic()
        full = self._storage_full(now)
        alive = self._server_alive()
        answered = alive and await self._probe()
        if answered:
            self.last_answer = time.monotonic()
        refused = alive and not answered and self._probe_refused
        if self._writer.batches > self._batches_at_resume:
            self._disk_full_failures = 0
        if answered and not full:
            if self.state is not State.AVAILABLE:
                await self._recover()
            return
        if full:
            self._outage(State.STORAGE_FULL, "the data directory's disk is full", _storage_full())
        elif not alive:
            self._outage(State.DATABASE_UNAVAILABLE, "the embedded PostgreSQL is not running",
                         _unavailable("postmaster_gone"))
        elif refused:
            self._outage(State.DATABASE_UNAVAILABLE, "the database refuses connections",
                         _unavailable("refused"))
        elif time.monotonic() - self.last_answer >= HUNG_AFTER_S:
            self._outage(State.DATABASE_UNAVAILABLE, "the database does not answer",
                         _unavailable("not_answering"))
        if not alive and not full:
            await self._restart_embedded()
        self._log_outage()

    def _outage(self, state: State, why: str, refusal: EngineError) -> None:
        if self.state is not state:
            if self.state is State.AVAILABLE:
                self.outage_started = time.monotonic()
                self.outages += 1
                self._refused_logged = self._refused
                self._last_log = time.monotonic()
            log.error("%s: writes are refused with 503 %s until it is back; reads of resident accounts are "
                      "answered from memory", why, refusal.code)
            self._set_state(state, why)
        self._writer.pause(refusal)

    def _log_outage(self) -> None:
        now = time.monotonic()
        if self.outage_started is None or now - self._last_log < LOG_INTERVAL_S:
            return
        refused, self._refused_logged = self._refused - self._refused_logged, self._refused
        self._last_log = now
        log.warning("%s for %.0f s: %d writes refused in the last %.0f s, %d restart attempts so far",
                    self.reason, now - self.outage_started, refused, LOG_INTERVAL_S, self._restart_attempts)

    async def _recover(self) -> None:
        """The server answers and has room: resume the writer (its new connection takes
        the lock and re-reads every cached head), restart the webhook worker."""
        writer, engine = self._writer, self.engine
        if engine.store.pool is not None:
            await engine.store.pool.expire_connections()
        writer.resume()
        if not await writer.ensure_connection():
            if writer.refusal is None:
                writer.pause(_unavailable("reconnecting"))
            return
        self._batches_at_resume = writer.batches
        await self._after_reconnect()
        took = time.monotonic() - self.outage_started if self.outage_started is not None else 0.0
        self.last_recovery_s = round(took, 2)
        log.warning("database back after %.1f s (%s); cached state re-read, writes resumed", took, self.reason)
        self._set_state(State.AVAILABLE, "ready")
        self.outage_started = None
        self._restart_attempts = 0

    # -- observations ------------------------------------------------------------------
    async def _probe(self) -> bool:
        """`SELECT 1` on the supervisor's own connection, within `PROBE_TIMEOUT_S`. A
        server that cannot be reached is tried again with backoff (up to
        `RECONNECT_BACKOFF_MAX_S` between attempts)."""
        # Only a fresh connection that the server refuses (an error, not a timeout) says
        # "refused" at once; no answer in time may be a hang (declared after HUNG_AFTER_S),
        # and a failure on an old connection is tried again on a new one first.
        self._probe_refused = False
        connecting = False
        try:
            if self._probe_connection is None or self._probe_connection.is_closed():
                if time.monotonic() < self._next_connect_at:
                    self._probe_refused = self._last_probe_refused
                    return False
                connecting = True
                self._probe_connection = await asyncio.wait_for(self.engine.store.connect(), PROBE_TIMEOUT_S)
                connecting = False
            await asyncio.wait_for(self._probe_connection.fetchval("SELECT 1"), PROBE_TIMEOUT_S)
            self._connect_failures = 0
            return True
        except (EngineError, asyncio.TimeoutError, OSError, Exception) as error:  # noqa: BLE001 - no answer
            timed_out = isinstance(error, asyncio.TimeoutError) or (
                isinstance(error, EngineError) and error.details.get("reason") == "TimeoutError")
            self._probe_refused = self._last_probe_refused = connecting and not timed_out
            if self._probe_connection is not None:
                self._probe_connection.terminate()
                self._probe_connection = None
            else:
                self._connect_failures += 1
                backoff = min(TICK_S * 2 ** self._connect_failures, RECONNECT_BACKOFF_MAX_S)
                self._next_connect_at = time.monotonic() + backoff
            return False

    def _server_alive(self) -> bool:
        embedded = self.engine._embedded
        return embedded is None or embedded.alive()

    def _storage_full(self, now: float) -> bool:
        """A write failed for want of space a moment ago (any server), or the embedded
        server's file system is below the minimum (checked before PostgreSQL runs out)."""
        if now < self._disk_full_until:
            return True
        embedded = self.engine._embedded
        if embedded is None:
            return False
        minimum = self.engine.settings.database.storage_free_min_mb << 20
        if self.state is State.STORAGE_FULL:
            minimum += STORAGE_HYSTERESIS_BYTES
        return embedded.free_bytes() < minimum

    # -- actions -----------------------------------------------------------------------
    async def _restart_embedded(self) -> None:
        now = time.monotonic()
        if now < self._next_restart_at:
            return
        self._restart_attempts += 1
        delay = RESTART_BACKOFF_S[min(self._restart_attempts, len(RESTART_BACKOFF_S) - 1)]
        log.warning("starting the embedded PostgreSQL again (attempt %d)", self._restart_attempts)
        try:
            await asyncio.to_thread(self.engine._embedded.restart)
            self.restarts += 1
            self._next_restart_at = 0.0
        except Exception as error:  # noqa: BLE001 - whatever stopped it: try again later
            self._next_restart_at = time.monotonic() + delay
            log.warning("the embedded PostgreSQL did not start (%s: %s); next attempt in %.1f s",
                        type(error).__name__, str(error)[:300], delay)

    async def _resync(self) -> None:
        """Re-reads every cached head from committed data (on a writer connection that
        holds the lock, before its first use)."""
        engine = self.engine
        keys = engine.keys
        passivated = engine.registry.passivate_all_idle()
        engine.portfolios.cache.clear()
        # Merged into the live table, not replacing it: operations in flight add their
        # keys to it as they commit (after this read).
        for key in await engine.store.recent_keys(keys.recent_max):
            keys.remember(key)
        await engine.risk.load()
        await engine.security.load()
        log.info("re-read committed state: %d idle accounts passivated (they load again on use), %d recent "
                 "idempotency keys, tokens and drawdown flags", passivated, len(keys.recent))

    async def _after_reconnect(self) -> None:
        """The writer writes again: accounts whose writes failed reload now (not at their
        next use), and webhook delivery resumes from its persisted cursors."""
        for account_id in list(self._writer.poisoned):
            self.engine.registry.tell(account_id, ReloadIfStale())
        await self._restart_webhooks()

    async def _restart_webhooks(self) -> None:
        webhooks = self.engine.webhooks
        try:
            await webhooks.stop()
            await webhooks.start()
        except EngineError as error:
            log.warning("webhook delivery did not restart: %s", error.message)

    async def _demote(self) -> None:
        """Another engine holds the writer lock: stop writing, forget what memory says."""
        log.error("this engine lost the writer lock (another engine writes now: %s); it stops writing and waits "
                  "as a standby", await self._holder())
        self._set_state(State.NOT_PRIMARY, "another engine holds the writer lock")
        self.outage_started = self.outage_started or time.monotonic()
        self._writer.pause(_not_primary())
        webhooks = self.engine.webhooks
        webhooks.table = None          # a standby saves no delivery progress
        await webhooks.stop()
        self.engine.registry.passivate_all_idle()

    async def _holder(self) -> str:
        try:
            if self._probe_connection is None or self._probe_connection.is_closed():
                self._probe_connection = await asyncio.wait_for(self.engine.store.connect(), PROBE_TIMEOUT_S)
            return await asyncio.wait_for(fence.writer_lock_holder(self._probe_connection), PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001
            return "unknown"

    async def _try_take_over(self) -> None:
        """A demoted engine takes the lock back when it is free (as a standby would)."""
        if not await self._probe():
            return
        self.last_answer = time.monotonic()
        connection = self._probe_connection
        try:
            if not await fence.take_writer_lock(connection, "alluse-standby"):
                return
            await fence.release_writer_lock(connection)
        except Exception:  # noqa: BLE001
            return
        self._lost_lock = False
        self._writer.resume()
        if not await self._writer.ensure_connection():
            if self._writer.refusal is None:
                self._writer.pause(_not_primary())
            self._lost_lock = False
            return
        await self._after_reconnect()
        log.warning("took the writer lock back: this engine writes again")
        self._set_state(State.AVAILABLE, "ready")
        self.outage_started = None


class RepeatFilter(logging.Filter):
    """Folds repeated warnings (same logger, same message template) into one line per
    `LOG_INTERVAL_S`: the first goes through, the next ones are counted, and the first
    after the interval carries the count. Information and debug lines pass untouched."""

    _installed: "RepeatFilter | None" = None
    LOGGERS = ("alluse.writer", "alluse.account", "alluse.engine", "alluse.registry", "alluse.gateway",
               "alluse.security", "alluse.store", "alluse.webhooks", "asyncio", "asyncpg.pool")
    # Their tracebacks say nothing the supervisor has not said: one line each.
    WITHOUT_TRACEBACK = frozenset({"asyncpg.pool"})

    def __init__(self) -> None:
        super().__init__()
        self._seen: dict[tuple[str, Any], list] = {}

    @classmethod
    def install(cls) -> None:
        if cls._installed is None:
            cls._installed = cls()
            for name in cls.LOGGERS:
                logging.getLogger(name).addFilter(cls._installed)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        if record.name in self.WITHOUT_TRACEBACK and record.exc_info:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__}: {error})"
            record.args, record.exc_info, record.exc_text = None, None, None
        now = time.monotonic()
        key = (record.name, record.msg)
        seen = self._seen.get(key)
        if seen is None or now - seen[0] >= LOG_INTERVAL_S:
            if seen is not None and seen[1]:
                record.msg = f"{record.msg} (and {seen[1]} more like this in the last {now - seen[0]:.0f} s)"
            self._seen[key] = [now, 0]
            if len(self._seen) > 1000:
                self._seen.clear()
            return True
        seen[1] += 1
        return False
