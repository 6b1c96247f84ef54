"""The account actor: one per resident account, its mailbox serializing that account's
operations. It carries no business rules: it calls `engine.rules.decide` on its
tentative state and `engine.ledger.apply_events` to turn the decision into the rows the
operation writes and the value it answers, hands them to the writer, and takes the next
message at once (pipelining; DESIGN-NOTES section 1). Nothing is decided twice: the
writer commits the rows as they are.

Two views of the account:
- `committed`: what PostgreSQL holds; reads are answered from it, so no reader ever sees
  a balance that might not survive;
- `tentative`: committed plus every operation still in flight (`pending`); decisions
  are taken against it.
After a failed write the actor turns *stale*: once every in-flight operation has
resolved it reloads its row through the writer's queue, behind every earlier write, and
holds the writes that arrive meanwhile until then (a reload that fails, because the
database is still away, refuses them with 503, safe to retry).

Every actor runs on the engine's event loop (`actors/runtime.py`), so an operation on
several accounts (a transfer, a merge, a portfolio's reinvestment) never leaves the
thread: the actor that receives it decides every account's part in one message, on each
account's tentative state, and submits one write. Because each account's parts reach
the writer in the order they were decided, entries carry their final `balance_after`
and `sequence` from the decision. No actor ever waits for another, so nothing can
deadlock; an account that cannot decide now (restarting after a failure) holds the
operation until it can."""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import msgspec

from engine.errors import EngineError, Unavailable, refuse
from engine.ledger import Rows, apply_events
from engine.model import Account, Command, Event
from engine.rules import DEFAULT_RULES, Rules, decide
from actors.idempotency import KeyClaim
from actors.ids import new_id
from actors.runtime import ActorPool, PooledActor
from persistence.writer import ReloadOp, Resolution, WriteOp

log = logging.getLogger("alluse.account")


class Reply:
    """Completes an asyncio future on its loop, from any thread, at most once. A keyed
    operation's reply also settles its idempotency key's claim, even when the caller has
    stopped waiting (timed out): the key stays in flight until the operation's outcome is
    known."""

    __slots__ = ("future", "loop", "claim")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future, claim: KeyClaim | None = None):
        self.loop = loop
        self.future = future
        self.claim = claim
        if claim is not None:
            assert not claim.attached, "one operation per idempotency key"
            claim.attached = True

    def _set(self, result: Any, error: BaseException | None) -> None:
        claim = self.claim
        if claim is not None:
            self.claim = None
            claim.settle(result, error)
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def done_on_loop(self, result: Any, error: BaseException | None) -> None:
        """The writer's continuation: it already runs on the loop."""
        self._set(result, error)

    def send(self, result: Any = None, error: BaseException | None = None) -> None:
        """From an actor (on the loop: at once) or from any other thread."""
        if asyncio._get_running_loop() is self.loop:
            self._set(result, error)
        else:
            self.loop.call_soon_threadsafe(self._set, result, error)


class Step(msgspec.Struct):
    """One account's part of an operation."""

    account_id: str
    actor: "AccountActor"
    transaction_id: str
    # The command, or a function of the events decided so far (a merge's last step).
    command: Command | Callable[[list[Event]], Command]
    # Refusals with these codes skip the step instead of failing the operation.
    skip_codes: frozenset[str] = frozenset()


class Decided(msgspec.Struct):
    """What an operation's render function sees: its entries, the state of every account
    after it, its events, and the steps skipped (account id, refusal code)."""

    transactions: list
    states: dict[str, Account]
    events: list[Event]
    skipped: list[tuple[str, str]]


class Operation(msgspec.Struct):
    """What the engine asks of the actors: the steps (one per account), the time and ids
    the core needs, the idempotency record and audit entry to commit with it, how to
    render its answer (`render(Decided)`), optional extra outbox rows
    (`outbox(rows, result)`), and where the answer goes."""

    op_id: int
    steps: list[Step]
    reply: Reply
    now: datetime
    render: Callable[[Decided], Any]
    correlation_id: str | None = None
    idempotency: KeyClaim | None = None
    audit: Any = None
    outbox: Callable[[Rows, Any], None] | None = None


class Read(msgspec.Struct):
    reply: Reply


class Resolved(msgspec.Struct):
    resolution: Resolution


class ReloadIfStale(msgspec.Struct):
    """The database is back: a stale account need not wait for its next write."""


class Reloaded(msgspec.Struct):
    state: Account | None
    error: BaseException | None


class InjectFault(msgspec.Struct):
    """Tests only (ALLUSE_FAULT_INJECTION=1): fail unexpectedly on the next message."""


class InjectedFault(RuntimeError):
    pass


@dataclass(slots=True)
class AccountActorHooks:
    """What an account actor needs from the engine around it."""

    submit: Callable[[WriteOp | ReloadOp], None]
    is_poisoned: Callable[[str], bool]
    self_tell: Callable[[str, Any], None]        # tell the resident actor of an account id
    on_failed: Callable[[str, Any, BaseException | None], None]  # the actor died unexpectedly
    rules: Rules = field(default_factory=lambda: DEFAULT_RULES)


def _restarting() -> Unavailable:
    return Unavailable("the account actor failed; retry with the same idempotency key", code="account_restarting")


def _reloading() -> Unavailable:
    return Unavailable("the account is reloading after a failed write; retry", code="account_reloading")


class AccountActor(PooledActor):
    def __init__(self, pool: ActorPool, account: Account, hooks: AccountActorHooks, *, restarted: bool = False):
        super().__init__(pool)
        self.account_id = account.id
        self.committed = account
        self.tentative = account
        self.pending: set[int] = set()
        self.stale = False
        self.reloading = False
        self.fault_armed = False
        # A restarted actor re-reads its row through the writer's queue (behind every
        # write its predecessor handed over) before it decides anything; until then it
        # holds operations back (`stash`) instead of refusing them.
        self.restarted = restarted
        self.hooks = hooks
        self.stash: collections.deque[Operation] = collections.deque()

    # -- lifecycle ---------------------------------------------------------------------
    def on_start(self) -> None:
        """An account whose last write failed while it was not resident is still
        poisoned in the writer: reload it before taking writes."""
        if self.hooks.is_poisoned(self.account_id):
            self._turn_stale()
        elif self.restarted:
            self.stale = True
            self._maybe_reload()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        """pykka's supervision hook: an exception escaped a message. Everything waiting
        here is answered with 503 (safe to retry); the supervisor decides what next."""
        while self.stash:
            self.on_dropped(self.stash.popleft())
        self.hooks.on_failed(self.account_id, self.actor_ref, exception_value)

    def on_dropped(self, message: Any) -> None:
        if isinstance(message, (Operation, Read)):
            message.reply.send(error=_restarting())

    def is_idle(self) -> bool:
        return not self.pending and not self.stale and not self.stash and self.mailbox_depth() == 0

    def can_decide(self) -> bool:
        """Free to decide a part of an operation now (on the loop, between messages)."""
        return not (self.restarted or self.stale or self.fault_armed or self.stash or self.stopped)

    # -- messages ----------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        if self.fault_armed and isinstance(message, (Operation, Read)):
            self.fault_armed = False
            self.on_dropped(message)
            raise InjectedFault(f"injected fault in account {self.account_id}")
        try:
            self._receive(message)
        except Exception:
            # An unexpected failure (a bug, not a refusal): answer the message's caller
            # now, then let the exception stop the actor so its supervisor starts a
            # fresh one from committed state.
            self.on_dropped(message)
            raise

    def _receive(self, message: Any) -> None:
        match message:
            case Operation():
                if self.stash:
                    self.stash.append(message)   # behind what already waits here
                else:
                    self._run(message)
            case Resolved():
                self.on_resolved(message)
            case Read(reply=reply):
                reply.send(self.committed)
            case Reloaded(state=state, error=error):
                self._reloaded(state, error)
            case ReloadIfStale():
                if self.stale:
                    self._maybe_reload()
            case InjectFault():
                self.fault_armed = True
            case _:
                raise AssertionError(f"unexpected message {message!r}")

    # -- deciding ----------------------------------------------------------------------
    def _run(self, operation: Operation) -> None:
        """Decides every step of `operation` now if all its accounts can; otherwise holds
        it until this account has re-read its committed state (restarted, or stale after
        a failed write: a reload that fails refuses what it held with 503), or hands it to
        the account that must come back first."""
        for step in operation.steps:
            if step.actor.stopped:
                operation.reply.send(error=_restarting())
                return
        for step in operation.steps:
            actor = step.actor
            if actor is self:
                if self.restarted or self.stale:
                    self.stash.append(operation)
                    if self.stale:
                        self._maybe_reload()
                    return
            elif not actor.can_decide():
                # Its own mailbox: an armed fault fails it there, a restart holds it.
                actor.deliver(operation)
                return
        self._decide(operation)

    def _decide(self, operation: Operation) -> None:
        rows = Rows()
        events_so_far: list[Event] = []
        skipped: list[tuple[str, str]] = []
        deciders: list[AccountActor] = []
        rules = self.hooks.rules
        for step in operation.steps:
            actor = step.actor
            command = step.command(events_so_far) if callable(step.command) else step.command
            state = rows.states.get(step.account_id, actor.tentative)
            try:
                events = decide(state, command, transaction_id=step.transaction_id, now=operation.now,
                                correlation_id=operation.correlation_id, rules=rules, new_id=new_id)
            except EngineError as refusal:
                if refusal.code not in step.skip_codes:
                    operation.reply.send(error=refusal)
                    return
                skipped.append((step.account_id, refusal.code))
                continue
            if not events:
                continue
            rows.touch(state)
            apply_events(rows, events)
            events_so_far.extend(events)
            deciders.append(actor)
        if not deciders:
            self._nothing_to_do(operation, skipped)
            return
        result = operation.render(Decided(rows.transactions, rows.states, events_so_far, skipped))
        if operation.outbox is not None:
            operation.outbox(rows, result)
        for actor in deciders:
            actor.tentative = rows.states[actor.account_id]
            actor.pending.add(operation.op_id)
        self.hooks.submit(WriteOp(op_id=operation.op_id, accounts=tuple(a.account_id for a in deciders),
                                  rows=rows, result=result, idempotency=operation.idempotency,
                                  done=operation.reply.done_on_loop, audit=operation.audit))

    def _nothing_to_do(self, operation: Operation, skipped: list[tuple[str, str]]) -> None:
        if skipped or len(operation.steps) > 1:
            code = skipped[0][1] if skipped else "nothing_to_do"
            operation.reply.send(error=refuse(code, "no account had anything to do",
                                              accounts=[account_id for account_id, _ in skipped]))
            return
        step = operation.steps[0]
        operation.reply.send(operation.render(Decided([], {step.account_id: step.actor.committed}, [], [])))

    # -- bookkeeping -------------------------------------------------------------------
    def on_resolved(self, message: Resolved) -> None:
        """The writer's news after a batch (handled at once by an idle actor,
        `PooledActor.deliver_now`)."""
        resolution = message.resolution
        pending = self.pending
        for op_id in resolution.committed_op_ids:
            pending.discard(op_id)
        for op_id in resolution.failed_op_ids:
            pending.discard(op_id)
        if resolution.state is not None and resolution.state.version > self.committed.version:
            self.committed = resolution.state
        if resolution.failed_op_ids:
            self._turn_stale()
        elif self.stale:
            self._maybe_reload()

    def _turn_stale(self) -> None:
        self.stale = True
        while self.stash:
            self.stash.popleft().reply.send(error=_reloading())
        self._maybe_reload()

    def _maybe_reload(self) -> None:
        if self.reloading or self.pending:
            return
        self.reloading = True
        account_id = self.account_id
        tell = self.hooks.self_tell
        self.hooks.submit(ReloadOp(account_id=account_id,
                                   done=lambda state, error: tell(account_id, Reloaded(state, error))))

    def _reloaded(self, state: Account | None, error: BaseException | None) -> None:
        self.reloading = False
        if error is not None or state is None:
            log.warning("account %s: reload failed: %s", self.account_id, error)
            # Nothing to wait for any more: refuse what was held (safe to retry). The next
            # write, or the database coming back (`ReloadIfStale`), tries again.
            self.restarted = False
            self.stale = True
            while self.stash:
                self.stash.popleft().reply.send(error=_reloading())
            return
        self.restarted = False
        self.committed = state
        self.tentative = state
        self.pending.clear()
        self.stale = False
        while self.stash and self.can_decide_own():
            self._run(self.stash.popleft())

    def can_decide_own(self) -> bool:
        return not (self.restarted or self.stale or self.fault_armed or self.stopped)
