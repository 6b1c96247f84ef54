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
queue, behind every earlier write.

Operations on several accounts (transfers, merges, a portfolio's reinvestment) travel as
a `Chain`: each account in turn decides its part on its tentative state, holds it, and
passes the chain on; the last one submits every part as one write. A refusal walks the
chain back (`Unwind`), each account dropping what it held, and the first one answers.
No actor ever waits for another, so no order of requests can deadlock."""
from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from pykka import ActorDeadError

from engine.errors import EngineError, Unavailable, refuse
from engine.model import Account, ChangeStatus, Close, Command, Event, MergeOut, UpdateAccount
from engine.rules import DEFAULT_RULES, Rules, decide, mutate_all
from actors.ids import new_id
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
        """From an actor (on the loop: at once) or from any other thread."""
        if asyncio._get_running_loop() is self.loop:
            self._set(result, error)
        else:
            self.loop.call_soon_threadsafe(self._set, result, error)


@dataclass(slots=True)
class Operation:
    """What the engine asks of one account actor: the command, the ids and time the core
    needs, the idempotency record to commit with it, and where the answer goes."""

    op_id: int
    command: Command
    reply: Reply
    now: datetime
    transaction_id: str
    render: Callable
    correlation_id: str | None = None
    idempotency: tuple[str, str] | None = None
    audit: Any = None


@dataclass(slots=True)
class ChainStep:
    account_id: str
    ref: Any
    transaction_id: str
    # The command, or a function of the events decided so far (a merge's last step).
    command: Command | Callable[[list[Event]], Command]
    # Refusals with these codes skip the step instead of failing the chain.
    skip_codes: frozenset[str] = frozenset()


@dataclass(slots=True)
class Chain:
    operation: Operation          # its `command` is unused; each step carries its own
    steps: list[ChainStep]
    index: int = 0
    events: list[Event] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass(slots=True)
class Unwind:
    chain: Chain
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
class InjectFault:
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


def _changes_status(command: Any) -> bool:
    return isinstance(command, (Close, ChangeStatus, MergeOut)) or (
        isinstance(command, UpdateAccount) and command.status is not None)


class AccountActor(PooledActor):
    def __init__(self, pool: ActorPool, account: Account, hooks: AccountActorHooks, *, restarted: bool = False):
        super().__init__(pool)
        self.account_id = account.id
        self.committed = account
        self.tentative = account
        self.pending: dict[int, list[Event]] = {}
        self.stale = False
        self.reloading = False
        self.fault_armed = False
        # A restarted actor re-reads its row through the writer's queue (behind every
        # write its predecessor handed over) before it decides anything; until then it
        # holds operations back instead of refusing them.
        self.restarted = restarted
        self.hooks = hooks
        # Operations and chain steps held back until nothing is in flight (`_must_wait`).
        self.stash: collections.deque[Operation | Chain] = collections.deque()

    # -- lifecycle ---------------------------------------------------------------------
    def on_start(self) -> None:
        """Runs on a pool thread. An account whose last write failed while it was not
        resident is still poisoned in the writer: reload it before taking writes."""
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
        error = Unavailable("the account actor failed; retry with the same idempotency key",
                            code="account_restarting")
        if isinstance(message, Operation):
            message.reply.send(error=error)
        elif isinstance(message, Chain):
            self._unwind(message, error)
        elif isinstance(message, Unwind):
            message.chain.index -= 1
            self._unwind(message.chain, message.error)
        elif isinstance(message, Read):
            message.reply.send(error=error)

    def is_idle(self) -> bool:
        return not self.pending and not self.stale and not self.stash and self.mailbox_depth() == 0

    # -- messages ----------------------------------------------------------------------
    def on_receive(self, message: Any) -> Any:
        if self.fault_armed and isinstance(message, (Operation, Chain, Read)):
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
                self._execute(message)
            case Chain():
                self._step(message)
            case Resolved(resolution=resolution):
                self._resolve(resolution)
            case Read(reply=reply):
                reply.send(self.committed)
            case Unwind(chain=chain, error=error):
                self.pending.pop(chain.operation.op_id, None)
                self._settle()
                chain.index -= 1
                self._unwind(chain, error)
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
    def _must_wait(self, command: Any) -> bool:
        """A status change waits until nothing is in flight. A transfer's debit is written
        by the *last* account of its chain, so it can reach the writer after commands this
        account decided later; a freeze, close or merge overtaking it would make the
        writer refuse the debit. Once one operation waits, later ones queue behind it."""
        return self.restarted or bool(self.stash) or (bool(self.pending) and _changes_status(command))

    def _release_stash(self) -> None:
        while self.stash and not self.stale and not self.restarted:
            message = self.stash[0]
            command = message.command if isinstance(message, Operation) else self._command_of(message)
            if self.pending and _changes_status(command):
                return
            self.stash.popleft()
            if isinstance(message, Operation):
                self._decide_and_submit(message)
            else:
                self._decide_step(message)

    def _decide(self, operation: Operation, command: Command, transaction_id: str) -> list[Event]:
        return decide(self.tentative, command, transaction_id=transaction_id, now=operation.now,
                      correlation_id=operation.correlation_id, rules=self.hooks.rules, new_id=new_id)

    def _execute(self, operation: Operation) -> None:
        if self._refuse_if_stale(lambda e: operation.reply.send(error=e)):
            return
        if self._must_wait(operation.command):
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
        self.hooks.submit(WriteOp(op_id=operation.op_id, accounts=(self.account_id,), events=tuple(events),
                                  idempotency=operation.idempotency, render=operation.render,
                                  done=operation.reply.done_on_loop, audit=operation.audit))

    # -- chains ------------------------------------------------------------------------
    @staticmethod
    def _command_of(chain: Chain) -> Command:
        command = chain.steps[chain.index].command
        return command(chain.events) if callable(command) else command

    def _step(self, chain: Chain) -> None:
        if self._refuse_if_stale(lambda e: self._unwind(chain, e)):
            return
        if self._must_wait(self._command_of(chain)):
            self.stash.append(chain)
            return
        self._decide_step(chain)

    def _decide_step(self, chain: Chain) -> None:
        step = chain.steps[chain.index]
        assert step.account_id == self.account_id
        try:
            events = self._decide(chain.operation, self._command_of(chain), step.transaction_id)
        except EngineError as refusal:
            if refusal.code not in step.skip_codes:
                self._unwind(chain, refusal)
                return
            chain.skipped.append((self.account_id, refusal.code))
            events = []
        if events:
            self._hold(chain.operation.op_id, events)
        chain.events.extend(events)
        chain.index += 1
        if chain.index < len(chain.steps):
            try:
                chain.steps[chain.index].ref.tell(chain)
            except ActorDeadError:
                # The next account's actor failed meanwhile: give back what this one holds.
                chain.index -= 1
                self.pending.pop(chain.operation.op_id, None)
                self._settle()
                self._unwind(chain, Unavailable("an account of this operation is restarting; retry",
                                                code="account_restarting"))
            return
        operation = chain.operation
        if not chain.events:
            code = chain.skipped[0][1] if chain.skipped else "nothing_to_do"
            operation.reply.send(error=refuse(code, "no account had anything to do",
                                              accounts=[account_id for account_id, _ in chain.skipped]))
            return
        self.hooks.submit(WriteOp(op_id=operation.op_id, accounts=tuple(s.account_id for s in chain.steps),
                                  events=tuple(chain.events), idempotency=operation.idempotency,
                                  render=operation.render, done=operation.reply.done_on_loop,
                                  audit=operation.audit))

    def _unwind(self, chain: Chain, error: BaseException) -> None:
        """Steps before `chain.index` hold their part: walk back; the first one answers.
        A step whose actor has died meanwhile is passed over (its holds died with it)."""
        while chain.index > 0:
            try:
                chain.steps[chain.index - 1].ref.tell(Unwind(chain, error))
                return
            except ActorDeadError:
                chain.index -= 1
        chain.operation.reply.send(error=error)

    # -- bookkeeping -------------------------------------------------------------------
    def _refuse_if_stale(self, reply_to: Callable[[BaseException], None]) -> bool:
        if not self.stale:
            return False
        if self.restarted:
            return False  # `_must_wait` holds it until the first reload lands
        self._maybe_reload()
        reply_to(Unavailable("the account is reloading after a failed write; retry", code="account_reloading"))
        return True

    def _hold(self, op_id: int, events: list[Event]) -> None:
        self.pending[op_id] = events
        self.tentative = mutate_all(self.tentative, events)

    def _resolve(self, resolution: Resolution) -> None:
        for op_id in resolution.committed_op_ids:
            self.pending.pop(op_id, None)
        for op_id in resolution.failed_op_ids:
            self.pending.pop(op_id, None)
        for op_id in resolution.dropped_op_ids:
            self.pending.pop(op_id, None)
        if resolution.state is not None and resolution.state.version > self.committed.version:
            self.committed = resolution.state
        if resolution.failed_op_ids:
            self._turn_stale()
        else:
            self._settle()

    def _settle(self) -> None:
        """After an operation left `pending`: recompute the tentative view (or go on
        towards a reload), then let waiting operations through."""
        if self.stale:
            self._maybe_reload()
            return
        self._recompute()
        self._release_stash()

    def _recompute(self) -> None:
        """tentative = committed + every operation still in flight, in decision order."""
        tentative = self.committed
        try:
            for events in self.pending.values():
                tentative = mutate_all(tentative, events)
        except AssertionError:
            log.warning("account %s: in-flight operations no longer fit its committed state", self.account_id)
            self._turn_stale()
            return
        self.tentative = tentative

    def _turn_stale(self) -> None:
        self.stale = True
        while self.stash:
            message = self.stash.popleft()
            error = Unavailable("the account is reloading after a failed write; retry", code="account_reloading")
            if isinstance(message, Operation):
                message.reply.send(error=error)
            else:
                self._unwind(message, error)
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
            if self.restarted:  # nothing to wait for any more: refuse what was held
                self.restarted = False
                self._turn_stale()
            return
        self.restarted = False
        self.committed = state
        self.tentative = state
        self.pending.clear()
        self.stale = False
        self._release_stash()
