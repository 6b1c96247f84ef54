"""Schemathesis hooks for `tests/test_fuzz.py` (loaded through SCHEMATHESIS_HOOKS).

Each generated request carries an Idempotency-Key of its own, as a client's would: a key
names one request. Generated deterministically, keys repeat across unrelated requests,
and a repeated key is answered with its first request's result (the SPEC's idempotency):
a webhook endpoint created, deleted, then "created" again by a request that reuses the
first one's key is answered with the deleted endpoint, which the stateful checks then
report as a created resource that is not found. Replays themselves are tested in
`tests/test_idempotency.py`, `tests/test_security.py` and `tests/test_webhooks.py`."""
from __future__ import annotations

import uuid

import schemathesis


@schemathesis.hook
def map_headers(context, headers):
    if headers and "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = str(uuid.uuid4())
    return headers
