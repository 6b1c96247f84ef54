"""Checks on raw request bytes that msgspec's typed decoding does not make (issue 14).

JSON (RFC 8259) says object names "SHOULD be unique" and leaves duplicates to the
parser; msgspec, like most parsers, keeps the last. A money API must not guess which of
`{"amount": 1, "amount": 777}` the client meant, so a body with a repeated name in any
one object is refused (400) before it is decoded. The check costs about a microsecond
for an ordinary flat body and runs only on request bodies."""
from __future__ import annotations

import re

import msgspec

# A JSON string (escapes included), optionally followed by the colon that makes it an
# object's member name, or a brace. Matched left to right from the start of a well-formed
# document, every match starts at a real token: outside strings there are no quotes.
_TOKENS = re.compile(rb'"([^"\\]*(?:\\.[^"\\]*)*)"(\s*:)?|([{}])')
_decode_any = msgspec.json.Decoder().decode


def duplicate_name(raw: bytes) -> str | None:
    """The first member name repeated within one object of the JSON document `raw`, or
    None. `raw` must already be known to be valid JSON (decoded once)."""
    if b"\\" not in raw:
        # No escapes: quotes delimit strings exactly, so the colons between strings are
        # the structural ones, one per member. A flat object (one brace pair outside
        # strings) has a duplicate exactly when it has more members than distinct names.
        parts = raw.split(b'"')
        structural = b"".join(parts[0::2])
        if structural.count(b"{") == 1:
            members = structural.count(b":")
            if members < 2:
                return None
            decoded = _decode_any(raw)
            if isinstance(decoded, dict) and len(decoded) == members:
                return None
    return _duplicate_name_nested(raw)


def _duplicate_name_nested(raw: bytes) -> str | None:
    """The exact check for any document: the names of each object, by nesting level."""
    stack: list[set | None] = []
    names: set | None = None
    for text, colon, brace in _TOKENS.findall(raw):
        if brace == b"{":
            stack.append(names)
            names = set()
        elif brace == b"}":
            names = stack.pop() if stack else None
        elif colon and names is not None:
            name = _decode_any(b'"' + text + b'"') if b"\\" in text else text.decode()
            if name in names:
                return name
            names.add(name)
    return None
