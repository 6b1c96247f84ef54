"""What the webhook API shows (responses of `actors.webhooks.Webhooks` and of the
/v1/webhooks routes): endpoints without their secrets, the one answer that carries a
secret, attempts, dead letters."""
from __future__ import annotations

from datetime import datetime

import msgspec


class WebhookView(msgspec.Struct, frozen=True, kw_only=True):
    """An endpoint as the API shows it: never its secrets."""

    id: str
    url: str
    description: str | None = None
    event_types: list[str] | None = None
    owner: str | None = None
    enabled: bool
    disabled_reason: str | None = None
    cursor: int
    last_success_at: datetime | None = None
    previous_secret_expires_at: datetime | None = None
    created_by: str
    created_at: datetime
    updated_at: datetime


class CreatedWebhook(WebhookView, frozen=True, kw_only=True):
    """The answer to creating an endpoint: the only time its secret is shown (`secret`;
    null in the answer to a retry with the same idempotency key)."""

    secret: str | None


class RotatedSecret(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    secret: str
    previous_secret_expires_at: datetime


class WebhookPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[WebhookView]


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    event_seq: int
    message_id: str
    attempt: int
    at: datetime
    # delivered, http_error, timeout, connection_error, refused_target, gone
    outcome: str
    status: int | None = None
    latency_ms: float
    response_excerpt: str | None = None
    error: str | None = None


class AttemptPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Attempt]
    next_cursor: str | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    event_seq: int
    event_type: str
    # dead, or redelivering (asked for; the next attempt settles it)
    state: str
    attempts: int
    last_outcome: str
    dead_at: datetime


class DeadLetterPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[DeadLetter]
    next_cursor: str | None = None


class Redelivery(msgspec.Struct, frozen=True, kw_only=True):
    requeued: int


def view(row: dict) -> WebhookView:
    """An endpoint row as the API shows it."""
    return WebhookView(**{name: row[name] for name in WebhookView.__struct_fields__})
