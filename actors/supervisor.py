"""Supervisors: one actor per portfolio (mirroring the fork tree) and one for standalone
accounts. pykka has no supervisors of its own; it calls an actor's `on_failure` when an
exception escapes a told message. The failed account actor reports here; the supervisor
restarts it from committed state, at most `restarts_max` times in `window_s` seconds
(Erlang/OTP's intensity and period), and past that quarantines the account: it refuses
work with 503 until an operator releases it. A business refusal is not a failure and
never reaches a supervisor."""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.runtime import ActorPool, PooledActor

STANDALONE = "standalone"


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    restarts_max: int = 5
    window_s: float = 60.0


@dataclass(slots=True)
class ChildFailed:
    account_id: str
    reason: str
    at_s: float = field(default_factory=time.monotonic)


@dataclass(slots=True)
class Restarted:
    account_id: str
    latency_s: float


@dataclass(slots=True)
class Release:
    account_id: str


@dataclass(slots=True)
class Snapshot:
    reply: Any


@dataclass(slots=True)
class SupervisorHooks:
    restart: Callable[[str, str], None]       # (account_id, supervisor_id), called from a pool thread
    quarantine: Callable[[str, str], None]    # (account_id, reason)
    release: Callable[[str], None]


class Supervisor(PooledActor):
    def __init__(self, pool: ActorPool, supervisor_id: str, policy: RestartPolicy, hooks: SupervisorHooks):
        super().__init__(pool)
        self.supervisor_id = supervisor_id
        self.policy = policy
        self.hooks = hooks
        self.recent: dict[str, collections.deque[float]] = {}
        self.restarts: collections.Counter[str] = collections.Counter()
        self.quarantined: dict[str, str] = {}
        self.last_failure: dict[str, str] = {}
        self.last_restart_latency_s: dict[str, float] = {}

    def on_receive(self, message: Any) -> Any:
        match message:
            case ChildFailed(account_id=account_id, reason=reason, at_s=at_s):
                self._child_failed(account_id, reason, at_s)
            case Restarted(account_id=account_id, latency_s=latency_s):
                self.last_restart_latency_s[account_id] = latency_s
            case Release(account_id=account_id):
                if self.quarantined.pop(account_id, None) is not None:
                    self.recent.pop(account_id, None)
                    self.hooks.release(account_id)
            case Snapshot(reply=reply):
                reply.send(self.snapshot())
            case _:
                raise AssertionError(f"unexpected message {message!r}")

    def _child_failed(self, account_id: str, reason: str, at_s: float) -> None:
        self.last_failure[account_id] = reason
        if account_id in self.quarantined:
            return
        window = self.recent.setdefault(account_id, collections.deque())
        window.append(at_s)
        while window and window[0] < at_s - self.policy.window_s:
            window.popleft()
        if len(window) > self.policy.restarts_max:
            why = (f"{len(window)} failures within {self.policy.window_s:g} s "
                   f"(limit {self.policy.restarts_max}); last: {reason}")
            self.quarantined[account_id] = why
            self.hooks.quarantine(account_id, why)
            return
        self.restarts[account_id] += 1
        self.hooks.restart(account_id, self.supervisor_id)

    def snapshot(self) -> dict:
        return {
            "restarts": dict(self.restarts),
            "quarantined": dict(self.quarantined),
            "last_failure": dict(self.last_failure),
            "last_restart_latency_ms": {k: round(v * 1000, 3) for k, v in self.last_restart_latency_s.items()},
        }
