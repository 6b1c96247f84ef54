"""Dispatch: the path of one operation between its caller and the actors.

`idempotent` admits the operation, bounds its wait (the operation deadline) and runs it
at most once per idempotency key (`actors/idempotency.py`); `run_steps` leases every
account it touches and hands the operation to the first account's actor in one message,
which decides every part and submits one write (`actors/account.py`); the caller then
waits for the reply the writer gives after COMMIT, or the actor's refusal. After each
batch, `notify_resolved` tells the touched actors what committed. Operations decided
without an actor (they open accounts that have none yet) go to the writer through
`write`."""
from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from typing import Any, Awaitable, Callable, TypeVar

import msgspec

from actors.account import Operation, Reply, Resolved, Step
from actors.context import OPERATION, audit_entry
from actors.ids import new_id, next_op_id
from engine import limits
from engine.errors import Overloaded, Unavailable, ValidationFailed
from engine.text import idempotency_key_valid
from persistence.writer import WriteOp

T = TypeVar("T")
NO_SKIP: frozenset[str] = frozenset()


def fingerprint(operation: str, target: str | None, request: msgspec.Struct) -> str:
    """What an idempotency key is bound to: the operation, its target and its request."""
    body = msgspec.json.encode(request)
    return hashlib.sha256(b"%s|%s|%s" % (operation.encode(), (target or "").encode(), body)).hexdigest()


def _check_key(key) -> None:
    """The gateway's check (`engine/text.py`): a key the HTTP API refuses is refused
    in-process too, before anything is decided or written."""
    if not idempotency_key_valid(key, limits.IDEMPOTENCY_KEY_LENGTH_MAX):
        raise ValidationFailed("the idempotency key must be 1 to 200 printable ASCII characters, not blank",
                               {"field": "Idempotency-Key"})


class Dispatch:
    """One per engine; `attach` gives it the parts that exist once the engine runs."""

    def __init__(self, engine) -> None:
        self.admission = engine.admission
        self.keys = engine.keys
        self.clock = engine.clock
        self._operations_per_account_max = engine.settings.engine.account_operations_in_flight_max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registry = None
        self._writer = None

    def attach(self, loop: asyncio.AbstractEventLoop, registry, writer) -> None:
        self._loop = loop
        self._registry = registry
        self._writer = writer

    async def idempotent(self, key: str | None, request: tuple[str, str | None, msgspec.Struct | dict],
                         result_type: type[T], run: Callable[[Any], Awaitable[T]]) -> T:
        """Admits the operation and runs `run` within the operation timeout, at most once
        per key (`actors/idempotency.py`): a retry while the first is in flight waits for
        its outcome; a retry after it committed gets the stored result (also after a
        restart); the same key with another request (operation, target, body) is refused."""
        if key is not None:
            _check_key(key)
        admission = self.admission
        admission.admit()
        # `admission.bounded`, inline: one coroutine less per operation.
        deadline = admission.deadline()
        try:
            reset = OPERATION.set((request[0], request[1] or getattr(request[2], "from_account", None)))
            admission.in_flight += 1
            try:
                if key is None:
                    return await run(None)
                return await self.keys.run(key, fingerprint(*request), result_type, run)
            finally:
                admission.in_flight -= 1
                OPERATION.reset(reset)
        except asyncio.CancelledError:
            admission.missed(deadline)
            raise
        finally:
            admission.done(deadline)

    async def keyed(self, key: str, request: tuple[str, str | None, msgspec.Struct | dict], result_type: type[T],
                    run: Callable[[Any], Awaitable[T]]) -> T:
        """`idempotent` for an operation that admits and bounds itself (a token's or a
        webhook endpoint's creation: their writes do): the key's check and claim only,
        so the operation is not admitted, or given a deadline, twice."""
        _check_key(key)
        return await self.keys.run(key, fingerprint(*request), result_type, run)

    async def on_account(self, account_id: str, command, render, idempotency, *, transaction_id=None,
                         correlation_id=None):
        """One command to one account's actor (leased for the duration); waits for the
        answer the writer (after COMMIT) or the actor (a refusal) gives."""
        return await self.run_steps([(account_id, command, NO_SKIP)], render, idempotency,
                                    correlation_id=correlation_id, transaction_id=transaction_id)

    async def run_steps(self, steps: list[tuple[str, Any, frozenset[str]]], render, idempotency, *,
                        correlation_id: str | None, transaction_id: str | None = None, outbox=None,
                        now: datetime | None = None):
        """An operation on one or more accounts: `steps` are (account id, command or
        function of the events so far, refusal codes that skip the step). Every account
        is leased (and activated) first; the first account's actor then decides every
        part in one message and submits one write."""
        entries = []
        registry = self._registry
        try:
            for account_id, _, _ in steps:
                entries.append(registry.acquire_resident(account_id) or await registry.acquire(account_id))
            # An operation is bounded where it enters: at its first account.
            if entries[0].leases > self._operations_per_account_max:
                raise Overloaded("too many operations in flight on this account", {"account_id": entries[0].account_id})
            future = self._loop.create_future()
            operation = Operation(
                op_id=next_op_id(), reply=Reply(self._loop, future, idempotency), now=now or self.clock(),
                render=render,
                correlation_id=correlation_id, idempotency=idempotency, audit=audit_entry(), outbox=outbox,
                steps=[Step(account_id=account_id, actor=entry.actor,
                            transaction_id=transaction_id if transaction_id and len(steps) == 1 else new_id("txn"),
                            command=command, skip_codes=skip)
                       for (account_id, command, skip), entry in zip(steps, entries)])
            if not entries[0].actor.deliver(operation):
                registry.forget(steps[0][0], entries[0].ref)
                raise Unavailable("the account actor stopped; retry", code="account_restarting")
            return await future
        finally:
            for entry in entries:
                registry.release(entry)

    async def write(self, rows, result, idempotency) -> Any:
        """An operation decided here rather than by an actor (it opens accounts that have
        none yet): straight to the writer."""
        future = self._loop.create_future()
        self._writer.enqueue(WriteOp(op_id=next_op_id(), accounts=(), rows=rows, result=result,
                                     idempotency=idempotency, done=Reply(self._loop, future, idempotency).done_on_loop,
                                     audit=audit_entry()))
        return await future

    def notify_resolved(self, resolutions) -> None:
        """After a batch, before its callers hear: each touched actor learns what
        committed (an idle one at once)."""
        registry = self._registry
        resident = registry.resident
        for account_id, resolution in resolutions.items():
            entry = resident.get(account_id)
            if entry is not None:
                actor = entry.actor
                if not actor.deliver_now(Resolved(resolution), actor.on_resolved):
                    registry.forget(account_id, entry.ref)

    def tell_from_any_thread(self, account_id: str, message: Any) -> None:
        if asyncio._get_running_loop() is self._loop:
            self._loop.call_soon(self._registry.tell, account_id, message)
        else:
            self._loop.call_soon_threadsafe(self._registry.tell, account_id, message)
