"""What callers pass in, checked before anything runs: keyword arguments validated into
the request Structs the gateway decodes, ids that cannot exist, page sizes."""
from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from engine import limits
from engine.errors import NotFound, ValidationFailed

T = TypeVar("T")


class Page(msgspec.Struct, frozen=True, kw_only=True):
    items: list
    next_cursor: str | None = None


def validate(request_type: type[T], **fields: Any) -> T:
    """Keyword arguments -> the same request Struct the gateway decodes, strictly."""
    try:
        return msgspec.convert({k: v for k, v in fields.items() if v is not None}, request_type, strict=True)
    except msgspec.ValidationError as error:
        raise ValidationFailed(str(error), {"reason": str(error)}) from error


def checked(request: Any, request_type: type[T]) -> T:
    """A request Struct as decoding would have checked it. A Struct's constructor checks
    no type or constraint, so an embedder's `DepositRequest(amount="7")` is checked here
    rather than failing inside an account's actor. 1-2 µs (the gateway's decoded requests
    are checked again: one check for every door)."""
    if type(request) is not request_type:
        raise ValidationFailed(f"expected a {request_type.__name__}", {"reason": f"got {type(request).__name__}"})
    try:
        return msgspec.convert(msgspec.structs.asdict(request), request_type, strict=True)
    except msgspec.ValidationError as error:
        raise ValidationFailed(str(error), {"reason": str(error)}) from error


def clean_text(value: Any, length_max: int) -> bool:
    return isinstance(value, str) and 1 <= len(value) <= length_max and "\x00" not in value


def check_id(value: Any, field: str = "id") -> None:
    """An id that cannot exist is simply not found (no database round trip)."""
    if not clean_text(value, limits.ID_LENGTH_MAX):
        raise NotFound("no such resource", {field: str(value)[:limits.ID_LENGTH_MAX].replace("\x00", "")})


def check_limit(limit: Any) -> None:
    """A page size: an int from 1 to `limits.PAGE_SIZE_MAX`."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= limits.PAGE_SIZE_MAX:
        raise ValidationFailed(f"limit must be 1 to {limits.PAGE_SIZE_MAX}", {"field": "limit"})
