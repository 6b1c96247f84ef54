"""Idempotency keys: at most one decision per key, and no database read per keyed
operation on the normal path.

- A key in flight is *claimed*: a retry that arrives meanwhile waits for the claimed
  operation's outcome instead of deciding again (DESIGN-NOTES section 1).
- The claim travels with the operation to the writer, which commits the key in the
  same transaction as the change; the key table's unique index is the check, at commit.
  A batch that meets a committed key (a retry the engine could not recognise) is sent
  again without that operation, which is answered with the stored result.
- The claim is settled by the operation's own reply (`actors.account.Reply`), not by the
  caller: a caller that timed out leaves its key claimed until the operation really
  commits or fails, so a retry can never decide it a second time meanwhile.
- Keys committed lately are remembered (loaded at start, kept as they commit): a request
  with one of them is looked up before it is decided, so a retry after a lost reply or a
  restart is answered from the key table without deciding again.

No asyncio Task and no `shield` per keyed operation: the caller awaits the operation's
reply future like an unkeyed caller; only a retry in flight gets a future of its own."""
from __future__ import annotations

import asyncio
import collections
from typing import Any, Awaitable, Callable, TypeVar

import msgspec

from engine.errors import IdempotencyKeyReused, KeyCommitted, NotFound, Refused, Unavailable, ValidationFailed

T = TypeVar("T")


class KeyClaim:
    """A key in flight with the fingerprint of its request. `attached` once an operation
    carries it (its reply settles the claim); `waiters` are retries waiting for it."""

    __slots__ = ("key", "fingerprint", "attached", "waiters", "_keys")

    def __init__(self, keys: "IdempotencyKeys", key: str, fingerprint: str):
        self.key = key
        self.fingerprint = fingerprint
        self.attached = False
        self.waiters: list[asyncio.Future] | None = None
        self._keys = keys

    def settle(self, result: Any, error: BaseException | None) -> None:
        """The claimed operation has an outcome: the key is no longer in flight."""
        keys = self._keys
        if keys.in_flight.get(self.key) is self:
            del keys.in_flight[self.key]
        if error is None:
            keys.remember(self.key)
        waiters, self.waiters = self.waiters, None
        if isinstance(error, asyncio.CancelledError):
            error = Unavailable("the first request with this idempotency key was cancelled; retry",
                                code="operation_timeout")
        for waiter in waiters or ():
            if waiter.done():
                continue
            if error is None:
                waiter.set_result(result)
            else:
                waiter.set_exception(error)


class IdempotencyKeys:
    """The engine's table of keys in flight and keys committed lately.

    `lookup(key)` answers a committed key's (fingerprint, response) from the key table;
    `mark_replayed()` tells the caller's context that its answer is a replay."""

    def __init__(self, *, lookup: Callable[[str], Awaitable[tuple[str, bytes] | None]],
                 mark_replayed: Callable[[], None], recent_max: int):
        self.in_flight: dict[str, KeyClaim] = {}
        self.recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.recent_max = recent_max
        self._lookup = lookup
        self._mark_replayed = mark_replayed

    def load(self, keys: list[str]) -> None:
        self.recent = collections.OrderedDict.fromkeys(keys)

    def remember(self, key: str) -> None:
        recent = self.recent
        recent[key] = None
        if len(recent) > self.recent_max:
            recent.popitem(last=False)

    async def run(self, key: str, fingerprint: str, result_type: type[T],
                  run: Callable[[KeyClaim], Awaitable[T]]) -> T:
        """Runs `run(claim)` at most once per key: a retry while the first is in flight
        waits for its outcome; a retry after it committed gets the stored result (also
        after a restart); the same key with another request is refused. The caller bounds
        the wait (the engine's operation deadline): a timed-out wait is a cancellation
        here, which settles an unattached claim like any failure."""
        claim = self.in_flight.get(key)
        if claim is not None:
            if claim.fingerprint != fingerprint:
                raise IdempotencyKeyReused("this idempotency key was used with a different request", {"key": key})
            self._mark_replayed()
            waiter = asyncio.get_running_loop().create_future()
            if claim.waiters is None:
                claim.waiters = []
            claim.waiters.append(waiter)
            return await self._answer(key, fingerprint, result_type, waiter)
        if key in self.recent:
            # Most likely a retry of a committed operation: answer it from the key table
            # rather than deciding it again.
            stored = await self._lookup(key)
            if stored is not None:
                return self._replay(key, fingerprint, stored[0], stored[1], result_type)
        claim = KeyClaim(self, key, fingerprint)
        self.in_flight[key] = claim
        try:
            result = await run(claim)
        except BaseException as error:
            if not claim.attached:   # no operation carries the key: nothing else settles it
                claim.settle(None, error)
            if isinstance(error, (KeyCommitted, Refused, NotFound, ValidationFailed)):
                return await self._stored_answer(key, fingerprint, result_type, error)
            raise
        if not claim.attached:
            claim.settle(result, None)
        return result

    async def _answer(self, key: str, fingerprint: str, result_type: type[T], outcome: Awaitable[T]) -> T:
        try:
            return await outcome
        except (KeyCommitted, Refused, NotFound, ValidationFailed) as error:
            return await self._stored_answer(key, fingerprint, result_type, error)

    async def _stored_answer(self, key: str, fingerprint: str, result_type: type[T], error: BaseException) -> T:
        """A committed key (found at commit) answers with its stored result. A refusal may
        be the retry of an operation that committed before the state changed (a
        withdrawal of everything, retried): only then is the stored result looked up."""
        if isinstance(error, KeyCommitted):
            return self._replay(key, fingerprint, error.fingerprint, error.response, result_type)
        stored = await self._lookup(key)
        if stored is None:
            raise error
        return self._replay(key, fingerprint, stored[0], stored[1], result_type)

    def _replay(self, key: str, fingerprint: str, stored_fingerprint: str, response: bytes, result_type: type[T]) -> T:
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused("this idempotency key was used with a different request", {"key": key})
        self._mark_replayed()
        return msgspec.json.decode(response, type=result_type)
