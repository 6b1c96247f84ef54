"""The account actor: one per resident account, its mailbox serializing that account's
operations. It carries no business rules: it calls `engine.rules.decide` on its
tentative state and hands the events to the writer with a continuation, then takes the
next message at once (pipelining; DESIGN-NOTES section 1).

Two views of the account:
- `committed`: what PostgreSQL holds; reads are answered from it, so no reader ever sees
  a balance that might not survive;
- `tentative`: committed plus every operation still in flight (`pending`, in decision
  order); decisions are taken against it.
After a failed write the actor turns *stale*: it refuses writes (503, safe to retry)
until every in-flight operation has resolved, then reloads its row through the writer's
queue, behind every earlier write."""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from engine.errors import EngineError, Unavailable
from engine.model import Account, ChangeStatus, Close, Command, Event, TransferCredit, UpdateAccount
from engine.rules import DEFAULT_RULES, Rules, decide, mutate
from actors.runtime import ActorPool, PooledActor
from persistence.writer import ReloadOp, Resolution, WriteOp

log = logging.getLogger("alluse.account")


class Reply:
    """Completes an asyncio future on its loop, from any thread, at most once."""

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.loop = loop
        self.future = future

    def _set(self, result: Any, error: BaseException | None) -> None:
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
        """From an actor thread."""
        self.loop.call_soon_threadsafe(self._set, result, error)


@dataclass(slots=True)
class Operation:
    """What the engine asks of an account actor: the command, the ids and time the core
    needs, the idempotency record to commit with it, and where the answer goes."""

    op_id: int
    command: Command
    reply: Reply
    now: datetime
    transaction_id: str
    render: Callable
    correlation_id: str | None = None
    idempotency: tuple[str, str] | None = None
    target: Any = None            # ActorRef of a transfer's target
    credit_transaction_id: str | None = None


@dataclass(slots=True)
class TransferIn:
    operation: Operation
    debit_events: list[Event]
    source: Any                   # ActorRef of the source
    source_id: str


@dataclass(slots=True)
class Undo:
    operation: Operation
    error: BaseException


@dataclass(slots=True)
class Read:
    reply: Reply


@dataclass(slots=True)
class Resolved:
    resolution: Resolution


@dataclass(slots=True)
class ReloadIfStale:
    """The database is back: a stale account need not wait for its next write."""


@dataclass(slots=True)
class Reloaded:
    state: Account | None
    error: BaseException | None


@dataclass(slots=True)
class AccountActorHooks:
    """What an account actor needs from the engine around it."""

    submit: Callable[[WriteOp | ReloadOp], None]
    is_poisoned: Callable[[str], bool]
    self_tell: Callable[[str, Any], None]   # tell the resident actor of an account id
    on_failed: Callable[[str, Any], None]   # the actor died unexpectedly
    rules: Rules = field(default_factory=lambda: DEFAULT_RULES)


class AccountActor(PooledActor):
    def __init__(self, pool: ActorPool, account: Account, hooks: AccountActorHooks):
        super().__init__(pool)
        self.account_id = account.id
        self.committed = account
        self.tentative = account
        self.pending: dict[int, list[Event]] = {}
        self.stale = False
        self.reloading = False
        self.hooks = hooks
        # Operations held back until nothing is in flight (see `_must_wait`), in order.
        self.stash: collections.deque[Operation] = collections.deque()

    # -- lifecycle ---------------------------------------------------------------------
    def on_start(self) -> None:
        """Runs on a pool thread. An account whose last write failed while it was not
        resident is still poisoned in the writer: reload it before taking writes."""
        if self.hooks.is_poisoned(self.account_id):
            self._turn_stale()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        while self.stash:
            self.on_dropped(self.stash.popleft())
        self.hooks.on_failed(self.account_id, self.actor_ref)

    def on_dropped(self, message: Any) -> None:
        error = Unavailable("the account actor stopped; retry", code="account_restarting")
        if isinstance(message, Operation):
            message.reply.send(error=error)
        elif isinstance(message, TransferIn):
            message.source.tell(Undo(message.operation, error))
        elif isinstance(message, (Undo,)):
            message.operation.reply.send(error=message.error)
        elif isinstance(message, Read):
            message.reply.send(error=error)

    def is_idle(self) -> bool:
        return not self.pending and not self.stale and not self.stash and self.mailbox_depth() == 0

    # -- messages ----------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
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
                self._execute(message)
            case TransferIn():
                self._credit(message)
            case Resolved(resolution=resolution):
                self._resolve(resolution)
            case Read(reply=reply):
                reply.send(self.committed)
            case Undo(operation=operation, error=error):
                self.pending.pop(operation.op_id, None)
                if self.stale:
                    self._maybe_reload()
                else:
                    self._recompute()
                operation.reply.send(error=error)
                self._release_stash()
            case Reloaded(state=state, error=error):
                self._reloaded(state, error)
            case ReloadIfStale():
                if self.stale:
                    self._maybe_reload()
            case _:
                raise AssertionError(f"unexpected message {message!r}")

    def _refuse_if_stale(self, reply_to: Callable[[BaseException], None]) -> bool:
        if not self.stale:
            return False
        self._maybe_reload()
        reply_to(Unavailable("the account is reloading after a failed write; retry", code="account_reloading"))
        return True

    def _decide(self, operation: Operation, command: Command, transaction_id: str) -> list[Event]:
        return decide(self.tentative, command, transaction_id=transaction_id, now=operation.now,
                      correlation_id=operation.correlation_id, rules=self.hooks.rules)

    @staticmethod
    def _changes_status(command: Command) -> bool:
        return isinstance(command, (Close, ChangeStatus)) or (
            isinstance(command, UpdateAccount) and command.status is not None)

    def _must_wait(self, operation: Operation) -> bool:
        """A status change waits until nothing is in flight. A transfer's debit is written
        by the *target's* actor, so it can reach the writer after commands this account
        decided later; a freeze or close overtaking it would make the writer refuse the
        debit. Once one operation waits, later ones queue behind it to keep their order."""
        return bool(self.stash) or (bool(self.pending) and self._changes_status(operation.command))

    def _release_stash(self) -> None:
        while self.stash and not self.stale:
            operation = self.stash[0]
            if self.pending and self._changes_status(operation.command):
                return
            self.stash.popleft()
            self._decide_and_submit(operation)

    def _execute(self, operation: Operation) -> None:
        if self._refuse_if_stale(lambda e: operation.reply.send(error=e)):
            return
        if self._must_wait(operation):
            self.stash.append(operation)
            return
        self._decide_and_submit(operation)

    def _decide_and_submit(self, operation: Operation) -> None:
        try:
            events = self._decide(operation, operation.command, operation.transaction_id)
        except EngineError as refusal:
            operation.reply.send(error=refusal)
            return
        if not events:
            operation.reply.send(operation.render([], {self.account_id: self.committed}))
            return
        self._hold(operation.op_id, events)
        if operation.target is not None:
            operation.target.tell(TransferIn(operation, events, self.actor_ref, self.account_id))
            return
        self.hooks.submit(WriteOp(op_id=operation.op_id, accounts=(self.account_id,), events=tuple(events),
                                  idempotency=operation.idempotency, render=operation.render,
                                  done=operation.reply.done_on_loop))

    def _credit(self, message: TransferIn) -> None:
        """The target's half of a transfer: check and tentatively credit, then submit both
        legs as one write; a refusal travels back to the source, which undoes its debit."""
        operation = message.operation
        source_undo = lambda error: message.source.tell(Undo(operation, error))  # noqa: E731
        if self._refuse_if_stale(source_undo):
            return
        debit = operation.command
        command = TransferCredit(from_account=message.source_id, amount=debit.amount, memo=debit.memo)
        try:
            events = self._decide(operation, command, operation.credit_transaction_id)
        except EngineError as refusal:
            source_undo(refusal)
            return
        self._hold(operation.op_id, events)
        self.hooks.submit(WriteOp(op_id=operation.op_id, accounts=(message.source_id, self.account_id),
                                  events=tuple(message.debit_events) + tuple(events),
                                  idempotency=operation.idempotency, render=operation.render,
                                  done=operation.reply.done_on_loop))

    def _hold(self, op_id: int, events: list[Event]) -> None:
        self.pending[op_id] = events
        for event in events:
            self.tentative = mutate(self.tentative, event)

    def _resolve(self, resolution: Resolution) -> None:
        for op_id in resolution.committed_op_ids:
            self.pending.pop(op_id, None)
        for op_id in resolution.failed_op_ids:
            self.pending.pop(op_id, None)
        if resolution.state is not None and resolution.state.version > self.committed.version:
            self.committed = resolution.state
        if resolution.failed_op_ids:
            self._turn_stale()
        elif self.stale:
            self._maybe_reload()
        else:
            self._recompute()
            self._release_stash()

    def _recompute(self) -> None:
        """tentative = committed + every operation still in flight, in decision order."""
        tentative = self.committed
        try:
            for events in self.pending.values():
                for event in events:
                    tentative = mutate(tentative, event)
        except AssertionError:
            log.warning("account %s: in-flight operations no longer fit its committed state", self.account_id)
            self._turn_stale()
            return
        self.tentative = tentative

    def _turn_stale(self) -> None:
        self.stale = True
        while self.stash:
            self.stash.popleft().reply.send(error=Unavailable(
                "the account is reloading after a failed write; retry", code="account_reloading"))
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
            return
        self.committed = state
        self.tentative = state
        self.pending.clear()
        self.stale = False
        self._release_stash()
