"""Webhooks (issue 11): the outbox's events delivered to a real receiving aiohttp server
started by each test, signed the Standard Webhooks way and verified with the
`standardwebhooks` package from the receiver's side; retries, the circuit breaker, 410,
dead letters and redelivery, secret rotation, owner scope, refused targets, the audit
records of management, and the HTTP routes. Real engine, real PostgreSQL."""
from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from standardwebhooks.webhooks import WebhookVerificationError

from actors.api import Engine
from actors.settings import load_settings
from actors.webhooks import GuardedResolver, RefusedTarget
from engine.errors import IdempotencyKeyReused, Refused, ValidationFailed
from engine.ledger import EVENT_TYPES
from engine.rules import quarter_of
from engine.webhooks import check_event_types, check_target, retry_delay_s, wants
from tests.conftest import eventually
from tests.test_analytics_engine import open_portfolio, weekly_premiums
from tests.test_http import TOKEN, assert_error, created_twice, new_key
from tests.test_http_growth import serving
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = {"allow_private_targets": True, "retry_schedule_s": [0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
        "jitter_ratio": 0.0, "poll_interval_s": 0.0, "gap_wait_s": 0.5, "timeout_s": 2.0,
        "circuit_failures_max": 50, "circuit_cooldown_s": 0.5}


def settings_for(database_url: str, **webhooks):
    return load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": TOKEN},
                              "engine": {"reinvest_schedule": False}, "webhooks": {**FAST, **webhooks}})


@asynccontextmanager
async def running(database_url: str, **webhooks):
    engine = Engine(settings_for(database_url, **webhooks))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def receiver():
    started = await Receiver().start()
    try:
        yield started
    finally:
        await started.stop()


async def feed_after(engine: Engine, after: int, owner: str | None = None) -> list:
    events = []
    while True:
        page = await engine.events_page(after=after, limit=500, owner=owner)
        if not page:
            return events
        events.extend(page)
        after = page[-1].seq


async def wait_delivered(receiver: Receiver, count: int, what: str = "deliveries", timeout_s: float = 20.0):
    async def probe():
        return len(set(receiver.delivered_seqs())) >= count

    await eventually(probe, f"{count} {what}", timeout_s=timeout_s)


async def endpoint_status(engine: Engine, endpoint_id: str) -> dict:
    return next(s for s in await engine.webhooks.status() if s["id"] == endpoint_id)


# -- the pure core -------------------------------------------------------------------------
async def test_targets_are_https_public_hosts_unless_private_ones_are_allowed():
    assert check_target("https://hooks.example.com/x?y=1", allow_private=False)
    for url in ("http://hooks.example.com/x", "https://127.0.0.1/x", "https://10.1.2.3/", "https://[::1]/",
                "https://169.254.169.254/latest", "https://localhost:8443/", "https://192.168.0.5",
                "https://[::ffff:10.0.0.1]/", "https://100.64.0.1/", "ftp://example.com/", "https://user:pw@example.com/",
                "https://", "not a url", "https://example.com:99999/", "https://0.0.0.0/"):
        with pytest.raises(ValidationFailed) as refused:
            check_target(url, allow_private=False)
        assert refused.value.details["field"] == "url", url
    assert check_target("http://127.0.0.1:9/hook", allow_private=True)
    assert check_target("https://10.0.0.1/hook", allow_private=True)
    with pytest.raises(ValidationFailed):
        check_target("http://hooks.example.com/", allow_private=True)  # plain http only to private hosts


async def test_event_type_patterns_and_the_retry_schedule():
    assert wants(None, "portfolio.forked") and wants(["*"], "account.opened")
    assert wants(["portfolio.*"], "portfolio.merged") and not wants(["portfolio.*"], "account.opened")
    assert wants(["transaction.posted"], "transaction.posted") and not wants(["transaction.posted"], "account.opened")
    schedule = (5.0, 300.0)
    assert retry_delay_s(schedule, 1, 0.0, 0.5) == 5.0 and retry_delay_s(schedule, 2, 0.2, 0.0) == 240.0
    assert retry_delay_s(schedule, 2, 0.2, 0.999999) == pytest.approx(360.0)
    assert retry_delay_s(schedule, 3, 0.2, 0.5) is None


async def test_event_type_patterns_must_match_an_event_type_the_engine_emits():
    for patterns in (["*"], ["portfolio.*"], ["account.drawdown_breach", "transfer.posted"], list(EVENT_TYPES), None):
        assert check_event_types(patterns) == patterns
    for patterns, bad in ((["bogus.type"], "bogus.type"), (["portfolio.forked", "portfolio.frked"], "portfolio.frked"),
                          (["nothing.*"], "nothing.*"), (["transfer.*", "transfers.posted"], "transfers.posted")):
        with pytest.raises(ValidationFailed) as refused:
            check_event_types(patterns)
        assert refused.value.details["field"] == "event_types" and refused.value.details["value"] == bad
        assert repr(bad) in str(refused.value), str(refused.value)


async def test_the_list_of_event_types_is_every_type_the_engine_writes():
    """EVENT_TYPES is kept by hand next to the code that writes events: every event type
    named where the outbox is written is in it, and it names nothing else."""
    root = Path(__file__).resolve().parent.parent
    written = set()
    for source in ("engine/ledger.py", "persistence/store.py"):
        tree = ast.parse((root / source).read_text())
        written |= {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and re.fullmatch(r"(account|transaction|transfer|portfolio)\.[a-z_]+", node.value)}
    assert written == set(EVENT_TYPES)
    listed = (root / "docs" / "webhooks.md").read_text()
    assert all(f"`{event_type}`" in listed for event_type in EVENT_TYPES)


async def test_a_name_that_resolves_to_a_private_address_is_refused_when_connecting():
    resolver = GuardedResolver(allow_private=False)
    try:
        with pytest.raises(RefusedTarget):
            await resolver.resolve("localhost", 443)
    finally:
        await resolver.close()
    allowed = GuardedResolver(allow_private=True)
    try:
        assert (await allowed.resolve("localhost", 443))[0]["host"] in ("127.0.0.1", "::1")
    finally:
        await allowed.close()


# -- delivery -------------------------------------------------------------------------------
async def test_every_event_of_a_workload_arrives_in_order_signed_exactly_as_the_feed_shows_it(database_url,
                                                                                              receiver):
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url, description="everything")
        assert created.secret.startswith("whsec_") and created.enabled
        start = created.cursor
        portfolio, opened, ids = await open_portfolio(engine, capital=200_000_00)
        rev, gen = ids["revenue"], ids["generation"]
        balance = await weekly_premiums(engine, rev, opened, range(1, 4), 100)
        await engine.book_trade(rev, kind="loss", amount=balance * 12 // 100, effective_date=opened + timedelta(weeks=5))
        await engine.transfer(rev, gen, 1_000_00)
        await engine.book_trade(gen, kind="premium", amount=60_000_00)                 # forks a unit
        unit = (await engine.get_portfolio(portfolio.id)).units[0]
        await engine.merge_portfolio(unit.id)                                         # merges it back
        await engine.reinvest_portfolio(portfolio.id, quarter_of(engine.clock().date()))
        await eventually(lambda: _has_types(engine, start, {"account.drawdown_breach"}), "the drawdown breach")

        feed = await feed_after(engine, start)
        types = {event.type for event in feed}
        assert {"account.opened", "portfolio.opened", "transaction.posted", "portfolio.forked", "portfolio.merged",
                "account.reinvested", "account.drawdown_breach"} <= types, types
        await wait_delivered(receiver, len(feed), "events of the workload")
        delivered = receiver.delivered()
        assert [r.event["seq"] for r in delivered] == [e.seq for e in feed]          # in commit order, once each
        for received, event in zip(delivered, feed):
            assert received.verify(created.secret) == json.loads(msgspec.json.encode(event))
            assert received.message_id == f"evt_{event.seq}"
            assert received.body == msgspec.json.encode(event)                       # the feed's very bytes
        with pytest.raises(WebhookVerificationError):
            delivered[0].verify("whsec_" + "A" * 32)

        async def cursor_saved():
            rows = await engine.store.fetch("SELECT cursor FROM webhook_endpoints WHERE id = $1", created.id)
            return rows[0]["cursor"] == feed[-1].seq

        await eventually(cursor_saved, "the durable cursor")
        status = await endpoint_status(engine, created.id)
        assert status["circuit"] == "closed" and status["lag_events"] == 0 and status["dead_letters"] == 0
        assert status["last_success_at"] is not None


async def _has_types(engine: Engine, after: int, wanted: set[str]) -> bool:
    return wanted <= {event.type for event in await feed_after(engine, after)}


async def test_a_receiver_that_fails_for_a_while_then_recovers_gets_everything_in_order(database_url, receiver):
    receiver.behaviour = lambda n: (500, 0.0) if n <= 4 else (200, 0.0)
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url)
        accounts = [await engine.create_account(name=f"a{n}", type="revenue", owner="ann") for n in range(3)]
        for account in accounts:
            await engine.deposit(account.id, 500)
        feed = await feed_after(engine, created.cursor)
        await wait_delivered(receiver, len(feed))
        assert receiver.delivered_seqs() == [e.seq for e in feed]
        assert [r.status for r in receiver.requests[:5]] == [500, 500, 500, 500, 200]
        # The first event was tried five times under one webhook-id.
        assert {r.message_id for r in receiver.requests[:5]} == {f"evt_{feed[0].seq}"}
        attempts = (await engine.webhooks.attempts(created.id, limit=10)).items
        assert [(a.attempt, a.outcome, a.status) for a in attempts[:5]] == [
            (1, "http_error", 500), (2, "http_error", 500), (3, "http_error", 500), (4, "http_error", 500),
            (5, "delivered", 200)]
        assert attempts[0].response_excerpt == "answer 500" and created.secret not in str(attempts)


async def test_a_receiver_that_times_out_opens_the_circuit_which_half_opens_and_closes(database_url, receiver):
    slow = {"on": True}
    receiver.behaviour = lambda n: (503, 1.0) if slow["on"] else (200, 0.0)
    async with running(database_url, timeout_s=0.2, circuit_failures_max=3, circuit_cooldown_s=1.0) as engine:
        created = await engine.webhooks.create(url=receiver.url)
        account = await engine.create_account(name="a", type="revenue", owner="ann")

        async def circuit_open():
            return (await endpoint_status(engine, created.id))["circuit"] == "open"

        await eventually(circuit_open, "the circuit to open")
        tried = len(receiver.requests)
        slow["on"] = False                                   # the trial after the cool-down will succeed
        assert tried == 3                                    # the circuit holds the endpoint's events
        attempts = (await engine.webhooks.attempts(created.id)).items
        assert [a.outcome for a in attempts][:3] == ["timeout"] * 3
        await engine.deposit(account.id, 100)
        feed = await feed_after(engine, created.cursor)
        await wait_delivered(receiver, len(feed))
        assert receiver.delivered_seqs() == [e.seq for e in feed]
        status = await endpoint_status(engine, created.id)
        assert status["circuit"] == "closed"
        assert [t["state"] for t in status["circuit_transitions"]] == ["open", "half_open", "closed"]


async def test_a_receiver_that_answers_410_disables_the_endpoint(database_url, receiver):
    receiver.behaviour = lambda n: (410, 0.0)
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url)
        account = await engine.create_account(name="a", type="revenue", owner="ann")

        async def disabled():
            return not engine.webhooks.get(created.id).enabled

        await eventually(disabled, "the endpoint to be disabled")
        view = engine.webhooks.get(created.id)
        assert "410" in view.disabled_reason and view.cursor == created.cursor
        await engine.deposit(account.id, 100)
        assert len(receiver.requests) == 1                   # nothing more is sent
        receiver.behaviour = lambda n: (200, 0.0)
        await engine.webhooks.update(created.id, enabled=True)     # resumes at the event 410 refused
        feed = await feed_after(engine, created.cursor)
        await wait_delivered(receiver, len(feed))
        assert receiver.delivered_seqs() == [e.seq for e in feed]


async def test_exhausted_events_become_dead_letters_and_redelivery_delivers_them(database_url, receiver):
    receiver.behaviour = lambda n: (500, 0.0)
    async with running(database_url, retry_schedule_s=[0.01, 0.01]) as engine:
        created = await engine.webhooks.create(url=receiver.url, event_types=["account.*"])
        for n in range(3):
            await engine.create_account(name=f"a{n}", type="revenue", owner="ann")
        feed = [e for e in await feed_after(engine, created.cursor) if e.type.startswith("account.")]

        async def all_dead():
            return len((await engine.webhooks.dead_letters(created.id)).items) == len(feed)

        await eventually(all_dead, "every event to be a dead letter")
        letters = (await engine.webhooks.dead_letters(created.id)).items
        assert [(d.event_seq, d.state, d.attempts, d.last_outcome) for d in letters] == [
            (e.seq, "dead", 3, "http_error") for e in feed]
        assert len(receiver.requests) == 3 * len(feed)
        receiver.behaviour = lambda n: (200, 0.0)
        assert (await engine.webhooks.redeliver(created.id, feed[1].seq)).requeued == 1

        async def one_left_out():
            return [d.event_seq for d in (await engine.webhooks.dead_letters(created.id)).items] == [
                feed[0].seq, feed[2].seq]

        await eventually(one_left_out, "the one redelivery")
        assert (await engine.webhooks.redeliver(created.id)).requeued == 2

        async def none_left():
            return not (await engine.webhooks.dead_letters(created.id)).items

        await eventually(none_left, "every redelivery")
        assert sorted(receiver.delivered_seqs()) == [e.seq for e in feed]
        assert (await endpoint_status(engine, created.id))["dead_letters"] == 0


async def test_after_a_rotation_the_receiver_verifies_with_the_old_and_the_new_secret(database_url, receiver):
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url)
        rotated = await engine.webhooks.rotate_secret(created.id)
        assert rotated.secret != created.secret and rotated.secret.startswith("whsec_")
        await engine.create_account(name="a", type="revenue", owner="ann")
        await wait_delivered(receiver, 1)
        request = receiver.delivered()[0]
        assert len(request.headers["webhook-signature"].split(" ")) == 2
        assert request.verify(rotated.secret) == request.verify(created.secret) == request.event
        assert created.secret not in json.dumps(msgspec.to_builtins(engine.webhooks.get(created.id)))


async def test_an_owner_scoped_endpoint_receives_only_its_owners_events(database_url, receiver):
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url, owner="ann")
        ann = await engine.create_account(name="ann", type="revenue", owner="ann")
        bob = await engine.create_account(name="bob", type="revenue", owner="bob")
        await engine.deposit(bob.id, 100)
        await engine.deposit(ann.id, 100)
        mine = await feed_after(engine, created.cursor, owner="ann")
        await wait_delivered(receiver, len(mine))
        assert receiver.delivered_seqs() == [e.seq for e in mine] and len(mine) == 2
        assert {r.event["account_id"] for r in receiver.delivered()} == {ann.id}


async def test_a_target_that_became_private_is_refused_at_delivery_time(database_url, receiver):
    async with running(database_url) as engine:
        created = await engine.webhooks.create(url=receiver.url)
    # The same endpoint, with private targets no longer allowed.
    async with running(database_url, allow_private_targets=False) as engine:
        await engine.create_account(name="a", type="revenue", owner="ann")

        async def refused():
            return [a.outcome for a in (await engine.webhooks.attempts(created.id)).items][:1] == ["refused_target"]

        await eventually(refused, "a refused attempt")
        assert receiver.requests == []


async def test_a_down_endpoint_never_delays_the_ledger(database_url, receiver):
    """The receiver holds every request for 5 s (past the timeout): transfers go on at
    their own pace meanwhile (the timing bound is generous: a shared machine)."""
    receiver.behaviour = lambda n: (503, 5.0)
    async with running(database_url, timeout_s=3.0) as engine:
        await engine.webhooks.create(url=receiver.url)
        first = await engine.create_account(name="a", type="revenue", owner="ann")
        second = await engine.create_account(name="b", type="revenue", owner="ann")
        await engine.deposit(first.id, 10_000)
        await eventually(lambda: _received(receiver), "the receiver to be holding a request")
        started = time.perf_counter()
        await asyncio.gather(*[engine.transfer(first.id, second.id, 1) for _ in range(200)])
        elapsed = time.perf_counter() - started
        assert elapsed < 2.5, f"200 transfers took {elapsed:.2f} s while the endpoint hung"
        assert len(receiver.requests) == 1


async def _received(receiver: Receiver) -> bool:
    return bool(receiver.requests)


# -- the HTTP API and the audit log --------------------------------------------------------
@pytest_asyncio.fixture(loop_scope="session")
async def api(database_url):
    async with serving(settings_for(database_url)) as client:
        yield client


async def test_webhook_management_over_http_is_audited_and_never_shows_the_secret_again(api, receiver, caplog):
    caplog.set_level(logging.DEBUG)
    created = await api.created("/v1/webhooks", {"url": receiver.url + "?token=receiver-side-secret",
                                                 "event_types": ["portfolio.*"], "description": "growth"})
    secret = created["secret"]
    webhook = f"/v1/webhooks/{created['id']}"
    assert (await api.ok(webhook))["event_types"] == ["portfolio.*"] and "secret" not in await api.ok(webhook)
    assert [w["id"] for w in (await api.ok("/v1/webhooks"))["items"]] == [created["id"]]
    updated = await api.call("PATCH", webhook, json_body={"enabled": False, "event_types": ["*"]})
    assert updated.status == 200 and updated.body["enabled"] is False
    rotated = await api.post(f"{webhook}/rotate-secret")
    assert rotated.status == 200 and rotated.body["secret"] != secret
    assert (await api.post(f"{webhook}/dead-letters/retry")).status == 202
    assert_error(await api.post(f"{webhook}/dead-letters/12345/retry"), 404, "not_found")
    assert (await api.ok(f"{webhook}/attempts"))["items"] == []
    assert (await api.ok(f"{webhook}/dead-letters"))["items"] == []
    assert (await api.call("DELETE", webhook)).status == 200
    assert_error(await api.get(webhook), 404, "not_found")
    assert_error(await api.call("DELETE", webhook), 404, "not_found")

    async def webhook_records():
        # A refusal's audit record is queued, not awaited by its reply (decision 76):
        # wait for the last one before reading the log.
        items = (await api.ok("/v1/audit?limit=1000"))["items"]
        return items if sum("webhook" in r["action"] for r in items) >= 7 else None

    log = await eventually(webhook_records, "the webhook routes' audit records", timeout_s=5)
    actions = [(r["action"], r["outcome"]) for r in log if "webhook" in r["action"]]
    assert actions == [("create_webhook", "committed"), ("update_webhook", "committed"),
                       ("rotate_webhook_secret", "committed"), ("redeliver_webhook", "committed"),
                       ("POST /v1/webhooks/{webhook_id}/dead-letters/{event_seq}/retry", "404 not_found"),
                       ("delete_webhook", "committed"), ("DELETE /v1/webhooks/{webhook_id}", "404 not_found")]
    text = json.dumps(log)
    assert secret not in text and rotated.body["secret"] not in text and "receiver-side-secret" not in text
    assert (await api.ok("/v1/audit/verify"))["valid"] is True
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert secret not in logged and rotated.body["secret"] not in logged


async def test_an_endpoint_created_twice_with_one_idempotency_key_is_made_once(api, receiver):
    # The key used to be ignored here: a retry after a lost answer made a second
    # endpoint, delivering every event twice (decision 88).
    body = {"url": receiver.url, "event_types": ["transfer.*"], "description": "once"}
    first, key = await created_twice(api, "/v1/webhooks", body, "secret")
    assert_error(await api.post("/v1/webhooks", {**body, "description": "another"}, key=key), 409,
                 "idempotency_key_reused")
    made = [w for w in (await api.ok("/v1/webhooks"))["items"] if w["description"] == "once"]
    assert [w["id"] for w in made] == [first["id"]]
    assert (await api.call("DELETE", f"/v1/webhooks/{first['id']}")).status == 200


async def test_an_endpoint_retried_with_its_key_after_a_restart_is_answered_from_the_key_table(database_url,
                                                                                             receiver):
    key = new_key()
    async with running(database_url) as engine:
        first = await engine.webhooks.create(url=receiver.url, description="restart", idempotency_key=key)
    async with running(database_url) as engine:
        again = await engine.webhooks.create(url=receiver.url, description="restart", idempotency_key=key)
        assert again == msgspec.structs.replace(first, secret=None)
        assert [w.id for w in engine.webhooks.list().items] == [first.id]
        stored = await engine.store.fetch("SELECT response FROM idempotency_keys WHERE key = $1", key)
        assert first.secret.encode() not in bytes(stored[0]["response"])   # it would outlive a rotation
        with pytest.raises(IdempotencyKeyReused):
            await engine.webhooks.create(url=receiver.url, description="other", idempotency_key=key)


async def test_refused_webhook_urls_answer_422_in_the_error_shape(database_url):
    settings = load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": TOKEN}})
    async with serving(settings) as api:
        for url in ("http://127.0.0.1:8080/hook", "https://10.0.0.8/hook", "https://[::1]/", "https://localhost/",
                    "https://169.254.169.254/", "http://hooks.example.com/"):
            assert_error(await api.post("/v1/webhooks", {"url": url}), 422, "validation_failed", "url")
        assert_error(await api.post("/v1/webhooks", {"url": "https://x.example", "event_types": ["Bad Type"]}), 422,
                     "validation_failed")
        assert_error(await api.post("/v1/webhooks", {"url": "https://x.example", "secret": "mine"}), 422,
                     "validation_failed")
        # A pattern that matches no event type the engine emits would receive nothing.
        typo = await api.post("/v1/webhooks", {"url": "https://h.example/x", "event_types": ["bogus.type"]})
        assert_error(typo, 422, "validation_failed", "event_types")
        assert typo.body["error"]["details"]["value"] == "bogus.type" and "bogus.type" in typo.body["error"]["message"]
        assert (await api.ok("/v1/webhooks"))["items"] == []
        created = await api.created("/v1/webhooks", {"url": "https://h.example/x", "event_types": ["portfolio.*"]})
        changed = await api.call("PATCH", f"/v1/webhooks/{created['id']}",
                                 json_body={"event_types": ["*", "account.opend"]})
        assert_error(changed, 422, "validation_failed", "event_types")
        assert (await api.ok(f"/v1/webhooks/{created['id']}"))["event_types"] == ["portfolio.*"]


async def test_supervisor_status_and_metrics_show_each_endpoint(api, receiver):
    created = await api.created("/v1/webhooks", {"url": receiver.url})
    await api.create_account("revenue", funded=100)
    await wait_delivered(receiver, 2)
    status = await api.ok("/v1/supervisor/status")
    [endpoint] = status["webhooks"]
    assert endpoint["id"] == created["id"] and endpoint["circuit"] == "closed" and endpoint["enabled"]
    assert {"lag_events", "lag_seconds", "last_success_at", "dead_letters"} <= set(endpoint)

    async def metrics_show_it():
        text = (await api.client.get("/metrics")).text
        body = await text() if callable(text) else text
        return ('alluse_webhook_deliveries_total{outcome="delivered"}' in body
                and f'alluse_webhook_circuit_state{{endpoint="{created["id"]}"}} 0.0' in body
                and "alluse_webhook_delivery_seconds_bucket" in body and "alluse_webhook_lag_seconds" in body)

    await eventually(metrics_show_it, "the webhook metrics")


async def test_the_horizon_waits_at_a_missing_sequence_number_then_passes_it():
    from types import SimpleNamespace

    from actors.webhooks import Webhooks

    settings = load_settings({}, {"webhooks": {"gap_wait_s": 5.0}})
    hooks = Webhooks(SimpleNamespace(settings=settings))
    page = [1, 2, 4, 5]                                             # 3 not visible (yet)
    gap = hooks._advance(page, None, now=100.0)
    assert hooks.horizon == 2 and gap == (3, 100.0)
    gap = hooks._advance(page[2:], gap, now=104.0)                  # still within gap_wait_s
    assert hooks.horizon == 2 and gap == (3, 100.0)
    assert hooks._advance([3, 4, 5], gap, now=104.5) is None
    assert hooks.horizon == 5                                       # 3 committed late: delivered in order
    gap = hooks._advance([7], None, now=200.0)
    assert hooks.horizon == 5
    assert hooks._advance([7], gap, now=205.1) is None and hooks.horizon == 7


async def test_the_endpoint_limit_refuses_with_409_and_deleting_a_busy_endpoint_is_clean(database_url, receiver):
    receiver.behaviour = lambda n: (500, 0.0)
    async with running(database_url, endpoints_max=2) as engine:
        with pytest.raises(ValidationFailed):
            await engine.webhooks.create(url=receiver.url, event_types=["portfolio.forkd"])
        first = await engine.webhooks.create(url=receiver.url)
        with pytest.raises(ValidationFailed):
            await engine.webhooks.update(first.id, event_types=["bogus.*"])
        await engine.webhooks.create(url=receiver.url)
        with pytest.raises(Refused) as refused:
            await engine.webhooks.create(url=receiver.url)
        assert refused.value.code == "webhook_limit_reached"
        await engine.create_account(name="a", type="revenue", owner="ann")
        await eventually(lambda: _received(receiver), "a failing attempt")
        await engine.webhooks.delete(first.id)                      # with attempts still buffered
        await engine.webhooks.flush_progress()
        rows = await engine.store.fetch("SELECT count(*) AS n FROM webhook_attempts WHERE endpoint_id = $1", first.id)
        assert rows[0]["n"] == 0 and first.id not in {s["id"] for s in await engine.webhooks.status()}


async def test_a_keyed_creation_is_admitted_once(database_url, receiver):
    # The key's claim and the creation's own write each admitted it: with one operation
    # allowed in flight, a keyed token or endpoint was always refused as overloaded.
    settings = settings_for(database_url)
    settings = msgspec.structs.replace(settings, engine=msgspec.structs.replace(settings.engine,
                                                                                operations_in_flight_max=1))
    engine = Engine(settings)
    await engine.start()
    try:
        token = await engine.security.create_token(name="once", role="viewer", idempotency_key=new_key())
        endpoint = await engine.webhooks.create(url=receiver.url, idempotency_key=new_key())
        assert token.token and endpoint.secret
    finally:
        await engine.stop()
