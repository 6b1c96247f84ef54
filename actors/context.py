"""The context of the operation running: who acts and which operation it is, for the
audit record each commit carries.

The gateway sets `AUDIT_CONTEXT` per request; in-process callers are the trusted embedded
principal. The dispatcher (`actors/dispatch.py`) sets `OPERATION` for each operation it
runs."""
from __future__ import annotations

import contextlib
import contextvars

from engine.audit import EMBEDDED, AuditContext
from persistence.writer import AuditEntry

AUDIT_CONTEXT: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar("alluse_audit", default=None)
OPERATION: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("alluse_operation",
                                                                                          default=None)


def audit_entry() -> AuditEntry:
    """The audit record of the operation running in this context."""
    context = AUDIT_CONTEXT.get() or AuditContext(EMBEDDED)
    action, target = OPERATION.get() or ("unknown", None)
    return AuditEntry(context=context, action=action, target=target)


_NO_OVERRIDE = contextlib.nullcontext()


def override(reason: str | None):
    """Puts an admin override's reason on this call's audit context (nothing to do, and
    nearly free on the hot path, without one)."""
    return _NO_OVERRIDE if reason is None else _overriding(reason)


@contextlib.contextmanager
def _overriding(reason: str):
    context = AUDIT_CONTEXT.get()
    if context is None:
        reset = AUDIT_CONTEXT.set(AuditContext(EMBEDDED, reason=reason))
        try:
            yield
        finally:
            AUDIT_CONTEXT.reset(reset)
        return
    before, context.reason = context.reason, reason
    try:
        yield
    finally:
        context.reason = before


def mark_replayed() -> None:
    """This call answers with an earlier call's result (same idempotency key)."""
    context = AUDIT_CONTEXT.get()
    if context is not None:
        context.replayed = True
