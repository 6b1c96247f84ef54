"""Webhooks' pure core: the request bodies of endpoint management, which targets are
acceptable (before any network is touched), which events an endpoint wants, and when
the next attempt is due. No I/O here; `actors.webhooks` is the shell that delivers."""
from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from msgspec import Meta, Struct

from engine import limits
from engine.errors import ValidationFailed
from engine.ledger import EVENT_TYPES
from engine.model import NO_NUL, Memo, Owner
from engine.requests import normalize_names

URL_LENGTH_MAX = 2000
EVENT_TYPES_MAX = 50
# "portfolio.forked", a whole family "portfolio.*", or everything "*".
EventType = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^(\*|[a-z_]+\.(\*|[a-z_]+))$")]
WebhookUrl = Annotated[str, Meta(min_length=1, max_length=URL_LENGTH_MAX, pattern=NO_NUL)]
EventTypes = Annotated[list[EventType], Meta(min_length=1, max_length=EVENT_TYPES_MAX)]


class CreateWebhookRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: WebhookUrl
    # None: every event type.
    event_types: EventTypes | None = None
    description: Memo | None = None
    # Only this owner's events (a token scoped to an owner always makes its own).
    owner: Owner | None = None

    def __post_init__(self) -> None:
        normalize_names(self)


class UpdateWebhookRequest(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: WebhookUrl | None = None
    event_types: EventTypes | None = None
    description: Memo | None = None
    enabled: bool | None = None


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A globally routable unicast address: not private, loopback, link-local, shared,
    reserved, unspecified or multicast (an IPv4 address inside IPv6 is judged as IPv4)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public_address(embedded)
    return address.is_global and not address.is_multicast


def _refuse(message: str) -> ValidationFailed:
    return ValidationFailed(message, {"field": "url", "reason": message})


def check_target(url: str, *, allow_private: bool) -> str:
    """The URL if it may receive webhooks, else `ValidationFailed` on `url`. `https`
    only, no credentials, and no private, loopback or link-local host - unless
    `allow_private`, which also lets plain `http` reach such hosts (an IP literal or
    `localhost`). A host name is judged again on its resolved addresses when a delivery
    connects (`actors.webhooks.GuardedResolver`)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("the url is not a valid URL") from None
    scheme, host = parts.scheme.lower(), parts.hostname
    if scheme not in ("https", "http") or not host:
        raise _refuse("the url must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("credentials in the url are not accepted")
    if port == 0:
        raise _refuse("the url's port must be 1 to 65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    local_name = host == "localhost" or host.endswith(".localhost")
    private = local_name or (address is not None and not is_public_address(address))
    if private and not allow_private:
        raise _refuse("private, loopback and link-local targets are refused")
    if scheme == "http" and not private:
        raise _refuse("the url must use https (plain http only to private targets, when they are allowed)")
    return url


def wants(event_types: list[str] | None, event_type: str) -> bool:
    """Does an endpoint subscribed to `event_types` (None: all) want this event?"""
    if event_types is None:
        return True
    family = event_type.split(".", 1)[0] + ".*"
    return any(pattern in ("*", event_type, family) for pattern in event_types)


def check_event_types(patterns: list[str] | None) -> list[str] | None:
    """The patterns if each matches an event type the engine emits, else
    `ValidationFailed` on `event_types` naming the first that matches none: a typo would
    otherwise subscribe an endpoint to nothing, silently."""
    for pattern in patterns or ():
        if not any(wants([pattern], event_type) for event_type in EVENT_TYPES):
            message = f"event type {pattern!r} matches no event the engine emits ({', '.join(EVENT_TYPES)})"
            raise ValidationFailed(message, {"field": "event_types", "value": pattern, "reason": message})
    return patterns


def retry_delay_s(schedule_s: tuple[float, ...], failures: int, jitter_ratio: float, unit_random: float) -> float | None:
    """How long to wait after the `failures`-th failed attempt of one event (1-based),
    or None when the schedule is exhausted (the event becomes a dead letter). Jitter
    spreads retries of many endpoints: each delay is scaled by 1 +- `jitter_ratio`,
    `unit_random` being uniform in [0, 1)."""
    assert failures >= 1 and 0 <= jitter_ratio < 1 and 0 <= unit_random < 1
    if failures > len(schedule_s):
        return None
    return schedule_s[failures - 1] * (1 + jitter_ratio * (2 * unit_random - 1))


assert limits.OWNER_LENGTH_MAX <= URL_LENGTH_MAX
