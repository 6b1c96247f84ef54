"""Hostile input (issue 14): what an attacker or a broken client sends is a 4xx with the
error shape, never a 5xx, never a guess and never a second owner that looks like the
first. Through the real app, actors and PostgreSQL (`tests.test_http`'s fixtures)."""
from __future__ import annotations

import asyncio
import json
import unicodedata

import pytest

from engine import text
from gateway.hardening import duplicate_name
from tests.test_http import TOKEN, Api, api, assert_error, new_key, world  # noqa: F401 (fixtures)

JSON_HEADERS = {"Content-Type": "application/json"}


async def raw_request(api: Api, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Sends bytes the aiohttp client would refuse to send (a non-ASCII header value)."""
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(head + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    payload = rest.split(b"\r\n\r\n", 1)[1]
    return int(status_line.split()[1]), json.loads(payload) if payload else {}


# -- bodies ---------------------------------------------------------------------------
async def test_invalid_utf8_in_a_body_is_a_400(api, world):
    reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits",
                           data=b'{"amount": 5, "memo": "caf\xe9"}', headers=JSON_HEADERS)
    assert_error(reply, 400, "malformed_json")
    reply = await api.post("/v1/accounts", data=b'{"name": "\xff\xfe", "type": "revenue", "owner": "ann"}',
                           headers=JSON_HEADERS)
    assert_error(reply, 400, "malformed_json")


async def test_a_lone_surrogate_escape_is_named_and_nothing_is_booked(api, world):
    """msgspec calls a lone high surrogate escape "truncated input"; the answer names it."""
    before = await api.ok(f"/v1/accounts/{world.revenue['id']}")
    reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", data=b'{"amount": 5, "memo": "\\ud800"}',
                           headers=JSON_HEADERS, key=new_key())
    assert_error(reply, 400, "malformed_json")
    message = reply.body["error"]["message"]
    assert "surrogate" in message and "truncated" not in message, message
    reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", data=b'{"amount": 5',
                           headers=JSON_HEADERS, key=new_key())
    assert_error(reply, 400, "malformed_json")
    assert "truncated" in reply.body["error"]["message"]   # a cut body still says so
    for cut in (b'{"amount": 5, "memo": "\\ud83d\\ude00"', b'{"amount": 5, "memo": "\\\\ud800"'):
        reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", data=cut, headers=JSON_HEADERS,
                               key=new_key())
        assert_error(reply, 400, "malformed_json")
        assert "truncated" in reply.body["error"]["message"], cut   # a whole pair, an escaped backslash
    assert (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"] == before["balance"]


@pytest.mark.parametrize("raw", [
    b'{"amount": 1, "amount": 777}',
    b'{"amount":1,"memo":"x","amount":777}',
    b'{"amount": 1, "\\u0061mount": 777}',
    b'{"memo": "quote \\" and {brace", "amount": 1, "amount": 2}',
], ids=["flat", "compact", "escaped-name", "escapes-and-braces-in-values"])
async def test_a_repeated_member_name_is_refused_and_nothing_is_booked(api, world, raw):
    before = await api.ok(f"/v1/accounts/{world.revenue['id']}")
    reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", data=raw, headers=JSON_HEADERS,
                           key=new_key())
    assert_error(reply, 400, "malformed_json", field="amount")
    assert (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"] == before["balance"]


async def test_a_repeated_name_inside_a_nested_object_is_refused_but_equal_names_in_two_objects_are_not(api):
    good = (b'{"initial_capital": 100000, "weeks": 4, "include_weeks": false, '
            b'"weekly_return_bps": {"generation": 10, "revenue": 5}, "cash_buffer_bps": {"generation": 100}}')
    assert (await api.post("/v1/projections", data=good, headers=JSON_HEADERS)).status == 200
    bad = good.replace(b'"revenue": 5}', b'"revenue": 5, "generation": 900}')
    assert_error(await api.post("/v1/projections", data=bad, headers=JSON_HEADERS), 400, "malformed_json",
                 field="generation")


def test_the_duplicate_check_agrees_with_a_reference_parser_on_tricky_documents():
    def reference(raw: bytes) -> str | None:
        found = []

        def pairs(items):
            names = [name for name, _ in items]
            repeated = [name for name in names if names.count(name) > 1]
            if repeated and not found:
                found.append(repeated[0])
            return dict(items)

        json.loads(raw, object_pairs_hook=pairs)
        return found[0] if found else None

    documents = [b'{}', b'{"a":1}', b'{"a":1,"b":2}', b'{"a":1,"a":2}', b'{"a" : 1 , "a" :2}',
                 b'{"a":"x:y","b":"a"}', b'{"a":{"a":1},"b":{"a":2}}', b'{"a":{"b":1,"b":2}}',
                 b'{"a":[{"x":1},{"x":1}]}', b'{"a":"\\"","a\\"":1}', b'{"\\u00e9":1,"\xc3\xa9":2}',
                 b'{"a":"}","b":"{","a":3}', b'[{"a":1,"a":1}]', b'"just a string"', b'{"k":"\\\\","k":1}']
    for document in documents:
        assert duplicate_name(document) == reference(document), document


# -- idempotency keys -----------------------------------------------------------------
async def test_a_non_ascii_byte_in_the_idempotency_key_is_a_422_not_a_503(api, world):
    head = (b"POST /v1/accounts/%s/deposits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nIdempotency-Key: key-\xe9\xff" % (world.revenue["id"].encode(),
                                                                                 TOKEN.encode()))
    status, body = await raw_request(api, head, b'{"amount": 5}')
    assert status == 422 and body["error"]["code"] == "validation_failed", body
    assert body["error"]["details"]["field"] == "Idempotency-Key"


@pytest.mark.parametrize("key", ["tab\tinside", "é-accented", "a" * 201], ids=["control", "non-ascii", "too-long"])
async def test_an_idempotency_key_outside_printable_ascii_is_refused(api, world, key):
    reply = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", {"amount": 5},
                           headers={"Idempotency-Key": key})
    assert_error(reply, 422, "validation_failed", field="Idempotency-Key")


async def test_two_idempotency_key_headers_are_refused_and_nothing_is_booked(api, world):
    before = (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"]
    head = (b"POST /v1/accounts/%s/deposits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nIdempotency-Key: first-%s\r\nIdempotency-Key: second-%s"
            % (world.revenue["id"].encode(), TOKEN.encode(), new_key().encode(), new_key().encode()))
    status, body = await raw_request(api, head, b'{"amount": 5}')
    assert status == 422 and body["error"]["details"]["field"] == "Idempotency-Key", body
    assert (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"] == before


async def test_a_printable_ascii_key_with_spaces_and_punctuation_works(api, world):
    key = f"order 42/{new_key()}:~!"
    first = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", {"amount": 5}, key=key)
    again = await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", {"amount": 5}, key=key)
    assert first.status == again.status == 201 and first.body["id"] == again.body["id"]


# -- owners, names, memos -------------------------------------------------------------
@pytest.mark.parametrize("owner", ["ann\u200b", "\u202eann", "ann\u2066", "   ", "\u00ad", "ann\u00a0lee",
                                   "ann\nlee", "\ufeffann", "ann\n", "ann\u2028", "\u2029ann", "ann\u00a0"],
                         ids=["zero-width-space", "bidi-override", "bidi-isolate", "blank", "soft-hyphen-only",
                              "no-break-space", "newline", "byte-order-mark", "final-newline",
                              "final-line-separator", "leading-paragraph-separator", "final-no-break-space"])
async def test_an_owner_with_invisible_control_or_bidi_characters_is_refused(api, owner):
    reply = await api.post("/v1/accounts", {"name": "n", "type": "revenue", "owner": owner}, key=new_key())
    assert_error(reply, 422, "validation_failed", field="owner")
    reply = await api.post("/v1/portfolios", {"name": "p", "owner": owner, "initial_capital": 100}, key=new_key())
    assert_error(reply, 422, "validation_failed", field="owner")


async def test_owners_that_look_alike_are_one_owner(api):
    owner = f"ánn-{new_key()[:8]}"
    spellings = [owner, unicodedata.normalize("NFD", owner), f"  {owner} ",
                 owner.translate({ord(c): ord(c) + 0xFEE0 for c in "0123456789abcdef-" if c != "-"})]
    stored = set()
    for spelling in spellings:
        account = await api.created("/v1/accounts", {"name": "x", "type": "revenue", "owner": spelling})
        stored.add(account["owner"])
    assert stored == {unicodedata.normalize("NFC", owner)}
    found = await api.ok(f"/v1/accounts?owner={unicodedata.normalize('NFD', owner)}")
    assert len(found["items"]) == len(spellings)
    assert_error(await api.get("/v1/accounts?owner=ann%E2%80%8B"), 422, "validation_failed", field="owner")


async def test_names_keep_unicode_but_are_normalized_and_refuse_control_characters(api):
    account = await api.created("/v1/accounts", {"name": "  Cafe\u0301 👩\u200d💻 ", "type": "revenue",
                                                 "owner": "ann"})
    assert account["name"] == "Café 👩\u200d💻"
    for bad in ("tab\there", "bell\x07", "\u202eevil", "   ", "final newline\n"):
        assert_error(await api.post("/v1/accounts", {"name": bad, "type": "revenue", "owner": "ann"}, key=new_key()),
                     422, "validation_failed", field="name")
        assert_error(await api.call("PATCH", f"/v1/accounts/{account['id']}", {"name": bad}), 422,
                     "validation_failed", field="name")


async def test_memos_keep_unicode_and_refuse_control_characters(api, world):
    done = await api.created(f"/v1/accounts/{world.revenue['id']}/deposits", {"amount": 1, "memo": "für 👩\u200d💻"})
    assert done["memo"] == "für 👩\u200d💻"
    for bad in ("line\nbreak", "\x1b[31mred", "\u2067isolate", "final newline\n"):
        assert_error(await api.post(f"/v1/accounts/{world.revenue['id']}/deposits", {"amount": 1, "memo": bad},
                                    key=new_key()), 422, "validation_failed", field="memo")


async def test_an_opening_day_before_1970_is_refused(api):
    """Year 1 was accepted and made the portfolio's analytics overflow PostgreSQL's date
    arithmetic (a 503 that told the client to retry)."""
    for day in ("0001-01-01", "1969-12-31"):
        assert_error(await api.post("/v1/portfolios", {"name": "p", "owner": "ann", "initial_capital": 100,
                                                       "opened_on": day}, key=new_key()),
                     422, "validation_failed", field="opened_on")
        assert_error(await api.post("/v1/accounts", {"name": "a", "type": "revenue", "owner": "ann",
                                                     "opened_on": day}, key=new_key()),
                     422, "validation_failed", field="opened_on")
    opened = await api.created("/v1/portfolios", {"name": "p", "owner": "ann", "initial_capital": 100,
                                                  "opened_on": "1970-01-01"})
    assert (await api.get(f"/v1/portfolios/{opened['id']}/analytics")).status == 200


async def test_the_embedding_api_normalizes_owners_the_same_way(engine):
    account = await engine.create_account(name=" gen ", type="generation", owner="ａｎｎ")
    assert (account.owner, account.name) == ("ann", "gen")
    with pytest.raises(Exception) as refused:
        await engine.create_account(name="gen", type="generation", owner="ann\u200b")
    assert getattr(refused.value, "code", None) == "validation_failed"


def test_identifier_rules():
    assert text.identifier("a\u0301nn", "owner", 200) == "\u00e1nn"
    assert text.identifier("ＡＮＮ", "owner", 200) == "ANN"
    for bad in ("ann\u200d", "an\u2028n", "\ue000"):
        with pytest.raises(ValueError):
            text.identifier(bad, "owner", 200)


# -- paths and queries ----------------------------------------------------------------
@pytest.mark.parametrize("path", ["/v1/accounts/%ED%A0%80", "/v1/accounts/%FF%FE", "/v1/transactions/%C0%AF",
                                  "/v1/accounts/acc_%E2%80%AE", "/v1/portfolios/%F0%9F%92%A9/tree"])
async def test_ids_that_are_not_ascii_are_not_found(api, path):
    reply = await api.get(path)
    assert reply.status == 404, (path, reply.status, reply.body)


@pytest.mark.parametrize("query", ["owner=%FF", "owner=%ED%A0%80", "cursor=%FF", "type=%00", "portfolio_id=%ED%A0%80"])
async def test_malformed_query_parameters_are_client_errors(api, query):
    reply = await api.get(f"/v1/accounts?{query}")
    assert reply.status < 500, (query, reply.status, reply.body)


async def test_made_up_http_methods_share_one_metrics_series(api, world):
    """Methods the engine never routes (aiohttp's parser accepts WebDAV's and others) are
    counted as "OTHER": dashboards see the methods the API has, and a client cannot add
    series by trying methods."""
    for method in (b"PROPFIND", b"TRACE", b"MKCOL"):
        status, body = await raw_request(api, method + b" /v1/accounts HTTP/1.1\r\nHost: x")
        assert status in (401, 404, 405), (method, status, body)
    metrics = (await api.get("/metrics", token=None)).body
    assert "PROPFIND" not in metrics and "TRACE" not in metrics and "MKCOL" not in metrics
    other = [line for line in metrics.splitlines()
             if line.startswith("alluse_http_requests_total{") and 'method="OTHER"' in line]
    assert other and sum(float(line.rsplit(" ", 1)[1]) for line in other) >= 3
