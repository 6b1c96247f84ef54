"""Which accounts have a live actor. Runs on the engine's event loop only, so it needs
no locks: activation (a miss loads the row and starts the actor; concurrent misses for
one id share one load), leases (an account in use by an operation is never passivated),
and passivation (least recently used first, under a resident cap)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pykka import ActorDeadError

from engine.errors import NotFound, Unavailable
from engine.model import Account

log = logging.getLogger("alluse.registry")


@dataclass(slots=True, eq=False)
class Resident:
    account_id: str
    ref: Any
    actor: Any
    leases: int = 0
    last_used_s: float = field(default_factory=time.monotonic)


class Registry:
    def __init__(self, *, load: Callable[[str], Awaitable[Account | None]], spawn: Callable[[Account], Any],
                 resident_max: int, metrics=None):
        self._load = load
        self._spawn = spawn
        self.resident_max = resident_max
        self.metrics = metrics
        self.resident: OrderedDict[str, Resident] = OrderedDict()
        self._loading: dict[str, asyncio.Future] = {}
        # Accounts whose supervisor gave up on them: they refuse work until released.
        self.quarantined: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.resident)

    def peek(self, account_id: str) -> Resident | None:
        entry = self.resident.get(account_id)
        if entry is not None and not entry.ref.is_alive():
            self.forget(account_id, entry.ref)
            return None
        return entry

    async def acquire(self, account_id: str) -> Resident:
        """The resident actor of `account_id`, activated if needed, with one more lease."""
        if account_id in self.quarantined:
            raise Unavailable("the account is quarantined after repeated failures; an operator must release it",
                              {"account_id": account_id, "reason": self.quarantined[account_id]},
                              code="account_quarantined")
        entry = self.peek(account_id)
        if entry is None:
            entry = await self._activate(account_id)
        entry.leases += 1
        entry.last_used_s = time.monotonic()
        self.resident.move_to_end(account_id)
        return entry

    def acquire_resident(self, account_id: str) -> Resident | None:
        """`acquire` without a suspension point, for an account that is resident and not
        quarantined; None otherwise (then `acquire` activates it or says why not)."""
        entry = self.resident.get(account_id)
        if entry is None or account_id in self.quarantined or entry.actor.stopped:
            return None
        entry.leases += 1
        entry.last_used_s = time.monotonic()
        self.resident.move_to_end(account_id)
        return entry

    def release(self, entry: Resident) -> None:
        entry.leases -= 1
        assert entry.leases >= 0

    async def restart(self, account_id: str) -> Resident | None:
        """A fresh actor for an account whose actor failed (unless something else
        activated it meanwhile, or it is quarantined)."""
        if account_id in self.quarantined:
            return None
        entry = self.peek(account_id)
        return entry if entry is not None else await self._activate(account_id, restarted=True)

    async def _activate(self, account_id: str, restarted: bool = False) -> Resident:
        loading = self._loading.get(account_id)
        if loading is None:
            loading = asyncio.get_running_loop().create_future()
            self._loading[account_id] = loading
            try:
                account = await self._load(account_id)
                entry = self.peek(account_id)
                if entry is None:
                    if account is None:
                        raise NotFound("no such account", {"account_id": account_id})
                    ref = self._spawn(account, restarted)
                    entry = Resident(account_id, ref, ref.actor_inbox.actor)
                    self.resident[account_id] = entry
                    if self.metrics:
                        self.metrics.activations.inc()
                    self._evict_over_cap(keep=account_id)
                loading.set_result(entry)
            except BaseException as error:
                loading.set_exception(error)
                loading.exception()  # retrieved: waiters re-raise it themselves
                raise
            finally:
                del self._loading[account_id]
            return entry
        entry = await asyncio.shield(loading)
        live = self.peek(account_id)
        return live if live is not None else await self._activate(account_id)

    def tell(self, account_id: str, message: Any, *, now: bool = False) -> bool:
        """Tells the resident actor of `account_id` (`now`: an idle one handles it at
        once, `PooledActor.deliver_now`); False if there is none."""
        entry = self.resident.get(account_id)
        if entry is None:
            return False
        if (entry.actor.deliver_now if now else entry.actor.deliver)(message):
            return True
        self.forget(account_id, entry.ref)
        return False

    def forget(self, account_id: str, ref: Any) -> None:
        entry = self.resident.get(account_id)
        if entry is not None and entry.ref is ref:
            del self.resident[account_id]

    def _passivate(self, entry: Resident) -> None:
        del self.resident[entry.account_id]
        try:
            entry.ref.stop(block=False)
        except ActorDeadError:
            pass
        if self.metrics:
            self.metrics.passivations.inc()

    def _evict_over_cap(self, keep: str) -> None:
        """Passivates idle accounts, least recently used first, until the cap holds. When
        every resident account is busy the cap is exceeded for a while rather than
        failing the caller: it is bounded by the operations in flight."""
        excess = len(self.resident) - self.resident_max
        if excess <= 0:
            return
        for entry in list(self.resident.values()):
            if excess <= 0:
                break
            if entry.account_id != keep and entry.leases == 0 and entry.actor.is_idle():
                self._passivate(entry)
                excess -= 1

    def passivate_idle(self, idle_s: float) -> int:
        """Passivates accounts unused for `idle_s`, oldest first; returns how many."""
        deadline = time.monotonic() - idle_s
        count = 0
        for entry in list(self.resident.values()):
            if entry.last_used_s > deadline:
                break
            if entry.leases == 0 and entry.actor.is_idle():
                self._passivate(entry)
                count += 1
        return count

    def passivate_all_idle(self) -> int:
        """Passivates every account that is idle now (no lease, nothing in flight), so it
        loads its committed state again on its next use; returns how many."""
        count = 0
        for entry in list(self.resident.values()):
            if entry.leases == 0 and entry.actor.is_idle():
                self._passivate(entry)
                count += 1
        return count

    def stop_all(self) -> None:
        for entry in list(self.resident.values()):
            self._passivate(entry)

    def mailbox_depths(self) -> dict[str, int]:
        return {account_id: e.actor.mailbox_depth() for account_id, e in self.resident.items()
                if e.actor.mailbox_depth()}
