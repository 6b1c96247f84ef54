"""What text the engine accepts from clients, and in which form it keeps it (issue 14).

Three kinds of text:
- *identifiers* (owners): compared for equality, so one person must not become two
  owners by invisible differences. Normalized as RFC 8265 (PRECIS) normalizes user
  names: full-width and half-width forms mapped to their ordinary forms, then Unicode
  NFC, then trimmed; control, format (zero-width, bidi embeddings, overrides and
  isolates, soft hyphen...), line and paragraph separator characters refused, and a
  value left empty by trimming refused;
- *names* (of accounts, portfolios, tokens): any Unicode, NFC, trimmed, never empty;
  control characters and bidi embeddings, overrides and isolates (which reorder what an
  operator reads: "Trojan Source", CVE-2021-42574) refused. Zero-width joiners stay:
  emoji sequences and several scripts need them;
- *memos*: free text kept exactly as sent, minus control characters and bidi
  embeddings, overrides and isolates.
Idempotency keys are printable ASCII (U+0020 to U+007E), 1 to 200 characters, not blank
(`idempotency_key_valid`: the gateway and the embedding API check the same).

What the engine *stores* of a request without validating it (the audit log's target,
request id and client: a refused request's path segment is recorded as sent) goes through
`storable`, since PostgreSQL's text cannot hold NUL or unpaired surrogates.

Pure functions; a refusal is a `ValueError` whose message names the field the way
msgspec does (`- at `$.owner``), so the gateway reports it as a 422 on that field."""
from __future__ import annotations

import re
import unicodedata

# C0 and C1 controls (and DEL); bidi embeddings/overrides (U+202A-U+202E) and isolates
# (U+2066-U+2069).
_CONTROL = "\\x00-\\x1f\\x7f-\\x9f"
_BIDI = "\\u202a-\\u202e\\u2066-\\u2069"
# A msgspec `Meta(pattern=...)` for names and memos (checked in C, on decode).
# `\Z`, not `$`: `$` also matches before a final newline, which let "ann\n" through.
TEXT_PATTERN = f"^[^{_CONTROL}{_BIDI}]*\\Z"

# Unicode categories an identifier may not contain: controls, format characters,
# surrogates, private use, unassigned, line and paragraph separators.
_REFUSED_IN_IDENTIFIERS = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_WIDTH_FORMS = re.compile("[\uff00-\uffef]")


def idempotency_key_valid(key: object, length_max: int) -> bool:
    """A key is printable ASCII, 1 to `length_max` characters, not only spaces: the same
    key in every client, log and store (an empty or blank key is a mistake, not "no
    key": two such deposits would both post)."""
    return (isinstance(key, str) and key.isascii() and key.isprintable() and 0 < len(key) <= length_max
            and not key.isspace())


def storable(value: str | None) -> str | None:
    """`value` as PostgreSQL's text can hold it: NUL and unpaired surrogates become
    U+FFFD (the replacement character); anything else is kept as it is."""
    if value is None or (value.isascii() and "\x00" not in value):
        return value
    value = value.replace("\x00", "\ufffd")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "".join("\ufffd" if "\ud800" <= character <= "\udfff" else character for character in value)
    return value


def _refuse(field: str, why: str) -> ValueError:
    return ValueError(f"{field} {why} - at `$.{field}`")


def _width_mapped(value: str) -> str:
    """Full-width and half-width forms (U+FF00-U+FFEF) to their compatibility
    decompositions ("ａｎｎ" -> "ann"), and nothing else (RFC 8265 section 3.2.1)."""
    if not _WIDTH_FORMS.search(value):
        return value
    return _WIDTH_FORMS.sub(lambda match: unicodedata.normalize("NFKC", match.group(0)), value)


def identifier(value: str, field: str, length_max: int) -> str:
    """The normalized form of an identifier (an owner), or `ValueError`."""
    mapped = unicodedata.normalize("NFC", _width_mapped(value))
    normalized = mapped.strip(" ")
    if not normalized:
        raise _refuse(field, "must not be empty or only white space")
    if len(normalized) > length_max:
        raise _refuse(field, f"must be at most {length_max} characters")
    # Checked before trimming anything but spaces: a line separator or a no-break space
    # at either end is refused like one inside, not trimmed away.
    for character in mapped:
        if unicodedata.category(character) in _REFUSED_IN_IDENTIFIERS or (
                character.isspace() and character != " "):
            raise _refuse(field, f"must not contain invisible, control or bidi characters "
                                 f"(found U+{ord(character):04X})")
    return normalized


def name(value: str, field: str, length_max: int) -> str:
    """The normalized form of a name (NFC, trimmed), or `ValueError`. Control and bidi
    characters were already refused by `TEXT_PATTERN` on decode."""
    normalized = unicodedata.normalize("NFC", value).strip()
    if not normalized:
        raise _refuse(field, "must not be empty or only white space")
    if len(normalized) > length_max:
        raise _refuse(field, f"must be at most {length_max} characters")
    return normalized

