"""A pykka runtime that runs many actors on a few threads.

pykka's `ThreadingActor` gives every actor its own OS thread; each message then costs a
thread hand-off under the GIL (~30 us here) and the process tops out near 22,000
threads. This runtime keeps pykka's `ActorRef`, `tell`/`ask`, proxies, futures and the
`on_failure` hook, but an actor's inbox schedules the actor on a shared pool of worker
threads when a message arrives. At most one worker runs a given actor at a time, so each
mailbox stays serialized, as with Akka's dispatchers or Orleans' scheduler.
"""
from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
from typing import Any

import pykka
from pykka import ActorDeadError, ActorRegistry, messages
from pykka._envelope import Envelope

log = logging.getLogger("alluse.runtime")

# Messages an actor handles before yielding its worker to the next ready actor.
SLICE_MESSAGES_MAX = 64


class ActorPool:
    """Worker threads taking ready actors from one queue."""

    def __init__(self, workers: int, name: str = "actor-worker"):
        assert 1 <= workers <= 64
        self._ready: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True)
                         for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def schedule(self, actor: "PooledActor") -> None:
        self._ready.put(actor)

    def _work(self) -> None:
        while True:
            actor = self._ready.get()
            if actor is None:
                return
            try:
                actor._run_slice()
            except BaseException:  # noqa: BLE001 - a worker must never die
                log.exception("actor slice crashed the worker loop")

    def stop(self, timeout_s: float = 5.0) -> None:
        for _ in self._threads:
            self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout_s)


class PooledInbox:
    """A deque plus a 'scheduled' flag: the first message into an idle inbox schedules
    its actor on the pool; the worker unschedules it when the inbox runs dry."""

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
    `on_failure`) run on one of the pool's threads, never two at once for one actor."""

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
        self.actor_inbox.actor = self

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
        if self.actor_stopped.is_set():
            return False
        self.actor_inbox.put(Envelope(message))
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
            if self.actor_stopped.is_set():
                self._teardown()
                return
            envelope = self.actor_inbox._pop_or_unschedule()
            if envelope is None:
                return
            self._handle_envelope(envelope)
        if self.actor_stopped.is_set():
            self._teardown()
            return
        # Fairness: let other ready actors run before this one's next slice.
        self._pool.schedule(self)

    def _handle_envelope(self, envelope: Any) -> None:
        try:
            response = self._handle_receive(envelope.message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:  # noqa: BLE001
                    self._handle_failure(*sys.exc_info())
        except BaseException:  # noqa: BLE001
            self._stop()
            ActorRegistry.stop_all()

    def _teardown(self) -> None:
        while True:
            envelope = self.actor_inbox._pop_or_unschedule()
            if envelope is None:
                # Stay "scheduled" forever so that late messages never run a dead actor.
                with self.actor_inbox._lock:
                    self.actor_inbox._scheduled = True
                return
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
