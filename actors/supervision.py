"""Supervision: the supervisor actors of the account actors (`actors/supervisor.py`: one
per portfolio, mirroring the fork tree, and one for standalone accounts), and what they
decide carried out on the engine's loop.

An account actor that fails reports here (`actor_failed`, from pykka's `on_failure`); its
supervisor restarts it from committed state (`_restart`) or, past its restart intensity,
quarantines the account (`_quarantine`) until an operator releases it (`release`).
Supervisors with nothing resident and nothing to remember are stopped (`passivate_idle`)."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError, NotFound
from actors.supervisor import STANDALONE, ChildFailed, Release, RestartPolicy, Restarted, Supervisor, \
    SupervisorHooks

if TYPE_CHECKING:
    from actors.api import Engine

log = logging.getLogger("alluse.supervision")


class Supervision:
    def __init__(self, engine: "Engine"):
        self._engine = engine
        settings = engine.settings.supervision
        self.policy = RestartPolicy(restarts_max=settings.restarts_max, window_s=settings.window_s)
        self.supervisors: dict[str, Any] = {}
        # When each failed account failed (its restart latency is measured from there).
        self._failed_at: dict[str, float] = {}
        self._hooks: SupervisorHooks | None = None

    def start(self) -> None:
        """The supervisors' decisions come from their actors' slices: carried out on the loop."""
        engine = self._engine
        loop = engine._loop
        self._hooks = SupervisorHooks(
            restart=lambda account_id, _: loop.call_soon_threadsafe(self._restart, account_id),
            quarantine=lambda account_id, why: loop.call_soon_threadsafe(self._quarantine, account_id, why),
            release=lambda account_id: loop.call_soon_threadsafe(engine.registry.quarantined.pop, account_id, None))

    def stop(self) -> None:
        for ref in self.supervisors.values():
            ref.stop(block=False)
        self.supervisors.clear()

    def supervisor_of(self, supervisor_id: str):
        """The supervisor of a portfolio (or STANDALONE), started if needed."""
        ref = self.supervisors.get(supervisor_id)
        if ref is None or not ref.is_alive():
            ref = Supervisor.start(self._engine._pool, supervisor_id, self.policy, self._hooks)
            self.supervisors[supervisor_id] = ref
        return ref

    def actor_failed(self, account_id: str, ref: Any, error: BaseException | None) -> None:
        """An account actor failed (pykka's `on_failure`, from any thread)."""
        engine = self._engine
        portfolio_id = ref.actor_inbox.actor.committed.portfolio_id
        reason = f"{type(error).__name__}: {error}"[:300] if error is not None else "unknown"
        log.error("account actor %s failed (%s); reporting to its supervisor", account_id, reason)
        engine.metrics.actor_failures.inc()
        engine._loop.call_soon_threadsafe(self._on_actor_failed, account_id, ref, portfolio_id, reason)

    def _on_actor_failed(self, account_id: str, ref: Any, portfolio_id: str | None, reason: str) -> None:
        self._engine.registry.forget(account_id, ref)
        self._failed_at[account_id] = time.monotonic()
        self.supervisor_of(portfolio_id or STANDALONE).tell(ChildFailed(account_id, reason))

    def _restart(self, account_id: str) -> None:
        self._engine._in_background(self._restart_now(account_id))

    async def _restart_now(self, account_id: str) -> None:
        engine = self._engine
        try:
            entry = await engine.registry.restart(account_id)
        except EngineError as error:
            log.warning("restart of %s deferred to its next use: %s", account_id, error.message)
            return
        failed_at = self._failed_at.pop(account_id, None)
        if failed_at is not None and entry is not None:
            latency = time.monotonic() - failed_at
            engine.metrics.restart_latency.observe(latency)
            engine.metrics.restarts.inc()
            self.supervisor_of(entry.actor.committed.portfolio_id or STANDALONE).tell(Restarted(account_id, latency))

    def _quarantine(self, account_id: str, why: str) -> None:
        log.error("account %s quarantined: %s", account_id, why)
        self._engine.metrics.quarantines.inc()
        self._engine.registry.quarantined[account_id] = why

    def release(self, account_id: str) -> None:
        """An operator's decision: let a quarantined account work again."""
        registry = self._engine.registry
        if account_id not in registry.quarantined:
            raise NotFound("the account is not quarantined", {"account_id": account_id})
        for ref in self.supervisors.values():
            ref.tell(Release(account_id))
        registry.quarantined.pop(account_id, None)

    def passivate_idle(self) -> None:
        """A supervisor with no resident account and nothing to remember goes too."""
        busy = {e.actor.committed.portfolio_id or STANDALONE for e in self._engine.registry.resident.values()}
        busy.add(STANDALONE)
        for supervisor_id, ref in list(self.supervisors.items()):
            if supervisor_id not in busy and not ref.actor_inbox.actor.quarantined \
                    and not ref.actor_inbox.actor.recent:
                ref.stop(block=False)
                del self.supervisors[supervisor_id]
