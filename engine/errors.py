"""Typed failures shared by every layer. Refusals are expected outcomes (a rule says no);
they carry a stable `code` that the gateway maps to an HTTP status. Bugs are not here:
those are assertions and ordinary exceptions."""


class EngineError(Exception):
    """Base of every expected failure. `code` is part of the public contract."""

    code = "error"

    def __init__(self, message: str, details: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def again(self) -> "EngineError":
        """A fresh copy to raise: raising one instance over and over (a standing refusal)
        would grow its traceback with every raise."""
        return type(self)(self.message, dict(self.details), self.code)


class Refused(EngineError):
    """A business rule refuses the operation (HTTP 409)."""

    code = "refused"


class NotFound(EngineError):
    code = "not_found"


class ValidationFailed(EngineError):
    code = "validation_failed"


class IdempotencyKeyReused(EngineError):
    code = "idempotency_key_reused"


class Unavailable(EngineError):
    """The engine cannot take or finish the operation now; nothing was acknowledged and a
    retry (with the same idempotency key) is safe. HTTP 503."""

    code = "unavailable"


class Overloaded(Unavailable):
    code = "overloaded"


class DatabaseUnavailable(Unavailable):
    code = "database_unavailable"


class KeyCommitted(Exception):
    """Internal, never shown: the operation's idempotency key had committed before (with
    this fingerprint and stored response), so the operation did not run again. The
    engine turns it into the stored result or `IdempotencyKeyReused`."""

    def __init__(self, fingerprint: str, response: bytes):
        super().__init__("idempotency key committed before")
        self.fingerprint = fingerprint
        self.response = response


def refuse(code: str, message: str, **details) -> Refused:
    return Refused(message, details, code=code)
