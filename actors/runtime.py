"""A pykka runtime that runs many actors on the engine's event loop.

pykka's `ThreadingActor` gives every actor its own OS thread; each message then costs a
thread hand-off under the GIL (~30 us here) and the process tops out near 22,000
threads. Under the GIL, threads add no parallelism to pure-Python decisions anyway; they
only add hand-offs. This runtime keeps pykka's `ActorRef`, `tell`, the mailbox per actor
and the `on_failure` hook, but an actor's inbox schedules the actor on the event loop
that runs the gateway, the engine and the writer: the first message into an idle inbox
puts the actor on the ready queue, and one loop callback runs every ready actor's slice
(many messages per wake-up). Each mailbox stays serialized (an actor runs one message at
a time, as with Akka's dispatchers or Orleans' scheduler), and a message between two
accounts never crosses a thread.

Consequences the rest of the engine relies on:
- actor hooks (`on_start`, `on_receive`, `on_failure`) run on the event loop, so they
  must never block (they only call the pure rules in `engine/`);
- pykka's blocking `ask(...).get()` would deadlock the loop: the engine only tells, and
  replies travel as asyncio futures completed by the actor;
- a message told from another thread is handed to the loop with one
  `call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
from typing import Any, Callable

import pykka
from pykka import ActorDeadError, ActorRegistry, messages
from pykka._envelope import Envelope

log = logging.getLogger("alluse.runtime")

# How long a stop waits for the tasks it cancelled.
STOP_WAIT_S = 5.0


async def stop_tasks(tasks: list[asyncio.Task], what: str, logger: logging.Logger = log,
                     timeout_s: float = STOP_WAIT_S) -> bool:
    """Cancels `tasks` and waits for them at most `timeout_s`: a task that swallows its
    cancellation (Python 3.11's `asyncio.wait_for` can, as its inner wait completes)
    must not hang a stop. Logs "`what` did not stop" if one is left; True if all ended."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return True
    await asyncio.wait(tasks, timeout=timeout_s)
    if all(task.done() for task in tasks):
        return True
    logger.warning("%s did not stop within %.1f s", what, timeout_s)
    return False

# Messages an actor handles before yielding to the next ready actor.
SLICE_MESSAGES_MAX = 64
# Actor slices one loop callback runs before it lets I/O and other callbacks in.
SLICES_PER_CALLBACK_MAX = 4096


class ActorPool:
    """The ready queue of the actors that run on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str = "actors"):
        self.name = name
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._ready: collections.deque = collections.deque()
        self._drain_pending = False
        self._stopped = False

    def schedule(self, actor: "PooledActor") -> None:
        if threading.get_ident() != self._loop_thread:
            if not self._stopped:
                self._loop.call_soon_threadsafe(self.schedule, actor)
            return
        self._ready.append(actor)
        if not self._drain_pending:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        ready = self._ready
        for _ in range(min(len(ready), SLICES_PER_CALLBACK_MAX)):
            actor = ready.popleft()
            try:
                actor._run_slice()
            except BaseException:  # noqa: BLE001 - the loop must never lose its actors
                log.exception("actor slice crashed")
        if ready and not self._drain_pending:
            self._drain_pending = True
            self._loop.call_soon(self._drain)

    def stop(self) -> None:
        """Runs what is ready (actors being stopped tear down and fail what they hold)."""
        self._drain()
        self._stopped = True


class PooledInbox:
    """A deque plus a 'scheduled' flag: the first message into an idle inbox schedules
    its actor on the pool; the actor unschedules itself when the inbox runs dry. The lock
    is for messages told from other threads (pykka's `stop`, tests)."""

    __slots__ = ("_items", "_lock", "_scheduled", "actor")

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = True  # until the actor has started
        self.actor: PooledActor | None = None

    def put(self, envelope: Any, block: bool = True, timeout: float | None = None) -> None:
        with self._lock:
            self._items.append(envelope)
            if self._scheduled:
                return
            self._scheduled = True
        self.actor._pool.schedule(self.actor)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        with self._lock:
            return self._items.popleft()

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)

    def _pop_or_unschedule(self) -> Any:
        with self._lock:
            if self._items:
                return self._items.popleft()
            self._scheduled = False
            return None


class PooledActor(pykka.Actor):
    """Base for actors on an `ActorPool`. Hooks (`on_start`, `on_receive`, `on_stop`,
    `on_failure`) run on the pool's event loop, one message at a time per actor."""

    @staticmethod
    def _create_actor_inbox() -> PooledInbox:
        return PooledInbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def __init__(self, pool: ActorPool, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pool = pool
        self._needs_setup = True
        # `actor_stopped.is_set()` as a plain attribute: it is read several times per
        # message on the hot path.
        self.stopped = False
        self.actor_inbox.actor = self

    def _stop(self) -> None:
        self.stopped = True
        super()._stop()

    def _handle_failure(self, *exc_info: Any) -> None:
        self.stopped = True
        super()._handle_failure(*exc_info)

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef:
        """Like `pykka.Actor.start`, minus the global `ActorRegistry`: its list scan on
        every stop would cost O(resident actors); our own registry tracks these."""
        obj = cls(*args, **kwargs)
        obj._start_actor_loop()
        return obj.actor_ref

    def _start_actor_loop(self) -> None:
        self._pool.schedule(self)

    def deliver(self, message: Any) -> bool:
        """`ActorRef.tell` minus its indirections (the engine's loop sends every message
        through here); False if the actor has stopped."""
        if self.stopped:
            return False
        self.actor_inbox.put(message)    # bare: `_handle_envelope` tells it from pykka's envelopes
        return True

    def deliver_now(self, message: Any, handler: Callable[[Any], None] | None = None) -> bool:
        """`deliver`, but an idle actor (nothing in its mailbox, not running, not waiting
        its turn) handles `message` at once, on the loop, instead of going through the
        ready queue: the same one-message-at-a-time handling, minus a scheduling round.
        The writer tells the actors what committed this way. `handler(message)`, if
        given, is what `on_receive` would call for it: handled at once, the message skips
        the dispatch (an exception still fails the actor, as from `on_receive`)."""
        inbox = self.actor_inbox
        if inbox._scheduled or inbox._items or self.stopped or self._needs_setup:
            return self.deliver(message)
        with inbox._lock:   # a message told from another thread meanwhile waits its turn
            inbox._scheduled = True
        try:
            if handler is None:
                self._handle_envelope(message)
            else:
                try:
                    handler(message)
                except Exception:
                    self._fail_on(message)
                except BaseException:  # noqa: BLE001 - as `_handle_envelope` does
                    self._abort()
        finally:
            if self.stopped:
                self._teardown()
            else:
                with inbox._lock:
                    inbox._scheduled = False
                    waiting = bool(inbox._items)
                if waiting:
                    inbox._scheduled = True
                    self._pool.schedule(self)
        return True

    def mailbox_depth(self) -> int:
        return self.actor_inbox.qsize()

    def on_dropped(self, message: Any) -> None:
        """Called (on a pool thread) for each told message left in the inbox when the
        actor stops, so continuations waiting on it can be failed instead of hanging."""

    def _run_slice(self) -> None:
        if self._needs_setup:
            self._needs_setup = False
            self._actor_loop_setup()
        for _ in range(SLICE_MESSAGES_MAX):
            if self.stopped:
                self._teardown()
                return
            envelope = self.actor_inbox._pop_or_unschedule()
            if envelope is None:
                return
            self._handle_envelope(envelope)
        if self.stopped:
            self._teardown()
            return
        # Fairness: let other ready actors run before this one's next slice.
        self._pool.schedule(self)

    def _abort(self) -> None:
        """A BaseException (an interrupt, an exit) escaped a message: pykka stops every actor."""
        self._stop()
        ActorRegistry.stop_all()

    def _fail_on(self, message: Any) -> None:
        """An exception escaped the handling of `message`: what `_handle_envelope` does."""
        self._handle_failure(*sys.exc_info())
        try:
            self.on_failure(*sys.exc_info())
        except Exception:  # noqa: BLE001
            self._handle_failure(*sys.exc_info())

    def _handle_envelope(self, envelope: Any) -> None:
        """`envelope` is pykka's (from `ActorRef.tell`/`ask`) or a bare message of ours
        (`deliver`): a bare one goes straight to `on_receive`, as pykka would send it."""
        reply_to = None
        try:
            if type(envelope) is not Envelope:
                self.on_receive(envelope)
                return
            reply_to = envelope.reply_to
            response = self._handle_receive(envelope.message)
            if reply_to is not None:
                reply_to.set(response)
        except Exception:
            if reply_to is not None:
                reply_to.set_exception()
            else:
                self._fail_on(envelope)
        except BaseException:  # noqa: BLE001
            self._abort()

    def _teardown(self) -> None:
        while True:
            envelope = self.actor_inbox._pop_or_unschedule()
            if envelope is None:
                # Stay "scheduled" forever so that late messages never run a dead actor.
                with self.actor_inbox._lock:
                    self.actor_inbox._scheduled = True
                return
            if type(envelope) is not Envelope:
                envelope = Envelope(envelope)
            if envelope.reply_to is not None:
                if isinstance(envelope.message, messages._ActorStop):  # noqa: SLF001
                    envelope.reply_to.set(None)
                else:
                    envelope.reply_to.set_exception(exc_info=(
                        ActorDeadError, ActorDeadError(f"{self.actor_ref} stopped"), None))
            else:
                try:
                    self.on_dropped(envelope.message)
                except Exception:  # noqa: BLE001
                    log.exception("on_dropped failed")
