"""Webhook delivery survives SIGKILL (issue 11): the service runs as a user runs it
(`python -m gateway`, its own embedded PostgreSQL, see tests/service_harness.py), delivers a
backlog of events to a real receiver started by the test, and is killed with SIGKILL in
the middle of it. After a restart on the same data directory every event of the feed has
arrived, in commit order, each verified with `standardwebhooks`; an event can arrive
twice across the crash (at least once), always under the same `webhook-id`."""
from __future__ import annotations

import asyncio
import threading
import time


from tests.service_harness import Client
from tests.test_crash import data_dir, services  # noqa: F401 - fixtures
from tests.webhook_receiver import Receiver

EVENTS = 120
RECEIVER_DELAY_S = 0.02
WAIT_S = 60.0


class ThreadedReceiver:
    """The test's receiver on its own event loop in a thread (the service helpers block)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="webhook-receiver", daemon=True)
        self.receiver = Receiver(behaviour=lambda _n: (200, RECEIVER_DELAY_S))

    def __enter__(self) -> Receiver:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.receiver.start(), self.loop).result(timeout=10)
        return self.receiver

    def __exit__(self, *exc_info) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


def wait_until(probe, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def feed(client: Client, after: int) -> list[dict]:
    events = []
    while True:
        page = client.ok(f"/v1/events?after={after}&limit=500")
        if not page["items"]:
            return events
        events.extend(page["items"])
        after = page["next_after"]


def test_sigkill_in_the_middle_of_delivery_loses_nothing_and_duplicates_keep_their_webhook_id(services,
                                                                                          monkeypatch):
    monkeypatch.setenv("ALLUSE_WEBHOOKS_ALLOW_PRIVATE", "1")
    monkeypatch.setenv("ALLUSE_WEBHOOKS_RETRY_SCHEDULE_S", "0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1,0.1")
    with ThreadedReceiver() as receiver:
        service = services()
        client = Client(service.port)
        webhook = client.created("/v1/webhooks", {"url": receiver.url})
        account = client.created("/v1/accounts", {"name": "a", "type": "revenue", "owner": "ann"})
        for _ in range(EVENTS):
            client.created(f"/v1/accounts/{account['id']}/deposits", {"amount": 1})
        wait_until(lambda: len(receiver.requests) >= 20, "the first deliveries")
        service.kill_engine()
        before = len(receiver.requests)
        assert before < EVENTS, "delivery was over before the kill; the test proves nothing"
        client.close()

        service = services()
        client = Client(service.port)
        expected = [event["seq"] for event in feed(client, webhook["cursor"])]
        assert len(expected) == EVENTS + 1
        wait_until(lambda: set(receiver.delivered_seqs()) >= set(expected), "every event after the restart")
        client.close()

    arrivals = receiver.delivered()
    seqs = [r.event["seq"] for r in arrivals]
    for received in arrivals:
        received.verify(webhook["secret"])
        assert received.message_id == f"evt_{received.event['seq']}"
    first_life, second_life = seqs[:before], seqs[before:]
    assert first_life == sorted(first_life) and second_life == sorted(second_life)   # in order in each life
    assert len(set(first_life)) == len(first_life) and len(set(second_life)) == len(second_life)
    assert second_life[0] <= first_life[-1] + 1                                        # resumed, no gap
    assert sorted(set(seqs)) == expected
    duplicates = len(seqs) - len(set(seqs))
    print(f"\n{before} delivered before SIGKILL, {len(second_life)} after the restart, {duplicates} duplicates")
