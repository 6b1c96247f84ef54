"""The growth routes of the HTTP API v1 (SPEC sections 3-4): portfolios, the fork tree,
fork, merge, reinvestment, projections, the event feed, the supervisor status and the
fault-injection admin routes, through the real aiohttp app, the real actors and a real
PostgreSQL database (one fresh database per test, from conftest.py).

The app runs with small growth thresholds (fork at $1,000 of surplus, merge at $5,000)
so a single premium over HTTP forks or merges. Bad input is table-driven like
tests/test_http.py: each case checks the status, the error code, the SPEC error shape
and that nothing changed (accounts, their histories, the portfolio trees and the event
feed). No request in this module may ever answer 500 (`Api.call` checks every reply)."""
from __future__ import annotations

import asyncio
import math
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from actors.settings import load_settings
from gateway.app import ROUTES, create_app
from test_http import (  # the HTTP contract suite's client and checks, reused as they are
    ACCOUNT_FIELDS, AMOUNT_MAX, TOKEN, TRANSACTION_FIELDS, Api, Case, assert_error, new_key,
)
from tests.conftest import eventually

FORK_THRESHOLD = 1_000_00
MERGE_THRESHOLD = 5_000_00
CAPITAL = 10_000_00  # splits into Gen-Acc 4_000_00, Rev-Acc 3_000_00, Com-Acc 3_000_00

TODAY = datetime.now(timezone.utc).date()  # the engine's clock is UTC
_QUARTER_NUMBER = (TODAY.month - 1) // 3 + 1
QUARTER = f"{TODAY.year}-Q{_QUARTER_NUMBER}"
NEXT_QUARTER = f"{TODAY.year + 1}-Q1" if _QUARTER_NUMBER == 4 else f"{TODAY.year}-Q{_QUARTER_NUMBER + 1}"
TOMORROW = (TODAY + timedelta(days=1)).isoformat()

PORTFOLIO_FIELDS = {"id", "name", "owner", "parent_id", "root_id", "depth", "status", "opened_on", "created_at",
                    "merged_at", "accounts", "units", "totals"}
PORTFOLIO_ACCOUNT_FIELDS = {"id", "name", "type", "status", "balance", "deployable", "baseline", "allocations"}
TOTALS_FIELDS = {"balance", "deployable", "generation", "revenue", "compounding"}
TREE_FIELDS = {"root_id", "nodes", "totals", "units_active", "units_merged", "truncated"}
NODE_FIELDS = {"id", "parent_id", "depth", "status", "accounts", "balance", "children"}
GROWTH_FIELDS = {"id", "kind", "portfolio_id", "amount", "created_at", "legs"}
YEAR_FIELDS = {"year", "total_value", "income", "forks", "merges", "active_units", "generation", "revenue",
               "compounding"}
RATES = {"generation": 150, "revenue": 100, "compounding": 50}


# -- apps ------------------------------------------------------------------------------
def growth_settings(database_url: str, **engine_overrides):
    overrides = {"database": {"url": database_url}, "server": {"admin_token": TOKEN},
                 "rules": {"fork_threshold_cents": FORK_THRESHOLD, "merge_threshold_cents": MERGE_THRESHOLD}}
    if engine_overrides:
        overrides["engine"] = engine_overrides
    return load_settings({}, overrides)


@asynccontextmanager
async def serving(settings):
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield Api(client)
    finally:
        await client.close()


@pytest_asyncio.fixture(loop_scope="session")
async def api(database_url):
    async with serving(growth_settings(database_url)) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def fault_api(database_url):
    """The same app with fault injection on (as with ALLUSE_FAULT_INJECTION=1)."""
    async with serving(growth_settings(database_url, fault_injection=True)) as client:
        yield client


# -- helpers ---------------------------------------------------------------------------
async def open_portfolio(api: Api, capital: int = CAPITAL, owner: str = "ann", **extra) -> dict:
    return await api.created("/v1/portfolios", {"name": f"P-{uuid.uuid4().hex[:6]}", "owner": owner,
                                                "initial_capital": capital, **extra})


def by_type(view: dict) -> dict[str, dict]:
    """A portfolio's (or a tree node's) accounts keyed by type."""
    accounts = {a["type"]: a for a in view["accounts"]}
    assert len(accounts) == len(view["accounts"])
    return accounts


async def trade(api: Api, account_id: str, amount: int, kind: str = "premium") -> dict:
    return await api.created(f"/v1/accounts/{account_id}/trades", {"kind": kind, "amount": amount})


async def events(api: Api, after: int = 0, limit: int = 500) -> list[dict]:
    """Every event after `after`, following next_after."""
    items = []
    for _ in range(10_000):
        page = await api.ok(f"/v1/events?after={after}&limit={limit}")
        assert set(page) == {"items", "next_after", "next_cursor"}
        if not page["items"]:
            assert page["next_after"] == after
            return items
        assert page["next_after"] == page["items"][-1]["seq"]
        items.extend(page["items"])
        after = page["next_after"]
    raise AssertionError("the event feed did not end")


async def last_event_seq(api: Api) -> int:
    feed = await events(api)
    return feed[-1]["seq"] if feed else 0



def supervised_account(status: dict, supervisor_id: str, account_id: str) -> dict | None:
    for node in status["supervisors"]:
        if node["id"] == supervisor_id:
            for account in node["accounts"]:
                if account["account_id"] == account_id:
                    return account
    return None


async def assert_legs_readable(api: Api, operation: dict) -> None:
    for leg in operation["legs"]:
        assert TRANSACTION_FIELDS <= set(leg), leg
        assert leg["correlation_id"] == operation["id"] and leg["kind"] == operation["kind"]
        assert await api.ok(f"/v1/transactions/{leg['id']}") == leg


def assert_portfolio_shape(view: dict) -> None:
    assert PORTFOLIO_FIELDS <= set(view), view
    assert TOTALS_FIELDS <= set(view["totals"])
    for account in view["accounts"]:
        assert PORTFOLIO_ACCOUNT_FIELDS <= set(account), account
        assert account["deployable"] == account["balance"] * 95 // 100
    totals = view["totals"]
    assert totals["balance"] == sum(a["balance"] for a in view["accounts"])
    assert totals["deployable"] == sum(a["deployable"] for a in view["accounts"])
    for account_type in ("generation", "revenue", "compounding"):
        assert totals[account_type] == sum(a["balance"] for a in view["accounts"] if a["type"] == account_type)
    for unit in view["units"]:
        assert set(unit) == {"id", "status", "balance"}


# -- portfolios --------------------------------------------------------------------------
async def test_a_portfolio_is_created_with_its_capital_split_40_30_30_and_read_back(api):
    reply = await api.post("/v1/portfolios", {"name": "Family", "owner": "ann", "initial_capital": 10_000_01},
                           key=new_key())
    assert reply.status == 201, reply.body
    portfolio = reply.body
    assert_portfolio_shape(portfolio)
    assert (portfolio["name"], portfolio["owner"], portfolio["parent_id"], portfolio["root_id"], portfolio["depth"],
            portfolio["status"], portfolio["opened_on"], portfolio["merged_at"], portfolio["units"]) == \
        ("Family", "ann", None, portfolio["id"], 0, "active", TODAY.isoformat(), None, [])
    accounts = by_type(portfolio)
    assert set(accounts) == {"generation", "revenue", "compounding"}
    # 40% and 30% rounded down; the Com-Acc takes the remainder.
    assert {t: a["balance"] for t, a in accounts.items()} == \
        {"generation": 4_000_00, "revenue": 3_000_00, "compounding": 3_000_01}
    assert {t: a["baseline"] for t, a in accounts.items()} == {"generation": 4_000_00, "revenue": 0, "compounding": 0}
    assert all(a["status"] == "active" and a["allocations"] == {"contracts": 0, "leaps": 0}
               for a in accounts.values())
    assert portfolio["totals"] == {"balance": 10_000_01, "deployable": sum(a["deployable"] for a in accounts.values()),
                                   "generation": 4_000_00, "revenue": 3_000_00, "compounding": 3_000_01}
    assert await api.ok(f"/v1/portfolios/{portfolio['id']}") == portfolio
    for account in accounts.values():
        full = await api.ok(f"/v1/accounts/{account['id']}")
        assert ACCOUNT_FIELDS <= set(full)
        assert (full["portfolio_id"], full["owner"], full["balance"], full["baseline"]) == \
            (portfolio["id"], "ann", account["balance"], account["baseline"])
        history = (await api.ok(f"/v1/accounts/{account['id']}/transactions"))["items"]
        assert [(t["kind"], t["direction"], t["amount"], t["balance_after"]) for t in history] == \
            [("deposit", "credit", account["balance"], account["balance"])]
    listed = await api.pages(f"/v1/accounts?portfolio_id={portfolio['id']}")
    assert sorted(a["id"] for a in listed) == sorted(a["id"] for a in accounts.values())


async def test_a_replayed_portfolio_creation_returns_the_same_portfolio_and_opens_nothing_new(api):
    body = {"name": "Once", "owner": "bob", "initial_capital": CAPITAL}
    key = new_key()
    first = await api.post("/v1/portfolios", body, key=key)
    assert first.status == 201
    before = await api.snapshot()
    again = await api.post("/v1/portfolios", body, key=key)
    assert again.status in (200, 201) and again.body == first.body
    assert await api.snapshot() == before
    assert_error(await api.post("/v1/portfolios", {**body, "initial_capital": CAPITAL + 1}, key=key), 409,
                 "idempotency_key_reused")
    assert await api.snapshot() == before


async def test_a_portfolio_can_be_dated_back_to_import_earlier_history(api):
    portfolio = await open_portfolio(api, opened_on="2026-01-05")
    assert portfolio["opened_on"] == "2026-01-05"
    for account in portfolio["accounts"]:
        full = await api.ok(f"/v1/accounts/{account['id']}")
        assert full["opened_on"] == "2026-01-05"
        opening = (await api.ok(f"/v1/accounts/{account['id']}/transactions"))["items"][-1]
        assert opening["effective_date"] == "2026-01-05"
    generation = by_type(portfolio)["generation"]["id"]
    booked = await api.created(f"/v1/accounts/{generation}/trades",
                               {"kind": "premium", "amount": 10_00, "effective_date": "2026-02-06"})
    assert booked["effective_date"] == "2026-02-06"
    today = await open_portfolio(api, opened_on=TODAY.isoformat())
    assert today["opened_on"] == TODAY.isoformat()


# -- fork --------------------------------------------------------------------------------
async def test_a_premium_that_lifts_the_gen_acc_past_the_threshold_forks_a_new_unit(api):
    root = await open_portfolio(api)
    generation = by_type(root)["generation"]["id"]
    premium = await trade(api, generation, 1_500_00)
    assert (premium["kind"], premium["direction"], premium["balance_after"]) == ("premium", "credit", 5_500_00)

    view = await api.ok(f"/v1/portfolios/{root['id']}")
    assert_portfolio_shape(view)
    assert by_type(view)["generation"]["balance"] == 4_000_00  # the whole surplus left
    assert len(view["units"]) == 1
    unit_id = view["units"][0]["id"]
    assert view["units"][0] == {"id": unit_id, "status": "active", "balance": 1_500_00}
    assert view["totals"]["balance"] == CAPITAL  # the root's own accounts
    # The premium's reply names the fork and the new unit.
    assert premium["growth"]["unit_id"] == unit_id and premium["growth"]["merge_id"] is None
    assert premium["growth"]["fork_id"].startswith("frk_")

    unit = await api.ok(f"/v1/portfolios/{unit_id}")
    assert_portfolio_shape(unit)
    assert (unit["parent_id"], unit["root_id"], unit["depth"], unit["status"], unit["owner"]) == \
        (root["id"], root["id"], 1, "active", "ann")
    accounts = by_type(unit)
    assert set(accounts) == {"generation", "compounding"}
    assert (accounts["generation"]["balance"], accounts["generation"]["baseline"]) == (750_00, 750_00)
    assert accounts["compounding"]["balance"] == 750_00

    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert set(tree) == TREE_FIELDS
    assert (tree["root_id"], tree["units_active"], tree["units_merged"], tree["truncated"]) == \
        (root["id"], 1, 0, False)
    nodes = {node["id"]: node for node in tree["nodes"]}
    assert set(nodes) == {root["id"], unit_id}
    assert all(NODE_FIELDS <= set(node) for node in tree["nodes"])
    assert nodes[root["id"]]["children"] == [unit_id] and nodes[unit_id]["children"] == []
    assert (nodes[unit_id]["parent_id"], nodes[unit_id]["depth"], nodes[unit_id]["balance"]) == \
        (root["id"], 1, 1_500_00)
    assert tree["totals"]["balance"] == CAPITAL + 1_500_00
    assert tree["totals"]["generation"] == 4_000_00 + 750_00

    forked = [e for e in await events(api) if e["type"] == "portfolio.forked"]
    assert len(forked) == 1
    assert (forked[0]["portfolio_id"], forked[0]["payload"]["amount"], forked[0]["payload"]["from_account"]) == \
        (unit_id, 1_500_00, generation)


async def test_a_manual_fork_moves_the_amount_into_a_new_unit_with_readable_legs(api):
    root = await open_portfolio(api)
    generation = by_type(root)["generation"]["id"]
    await trade(api, generation, 300_00)  # a surplus below the fork threshold: no automatic fork
    assert (await api.ok(f"/v1/portfolios/{root['id']}"))["units"] == []

    reply = await api.post(f"/v1/accounts/{generation}/fork", {"amount": 100_01}, key=new_key())
    assert reply.status == 201, reply.body
    fork = reply.body
    assert GROWTH_FIELDS <= set(fork)
    assert (fork["kind"], fork["amount"], len(fork["legs"])) == ("fork", 100_01, 3)
    unit = await api.ok(f"/v1/portfolios/{fork['portfolio_id']}")
    unit_accounts = by_type(unit)
    assert unit["parent_id"] == root["id"]
    legs = {(leg["account_id"], leg["direction"]): leg for leg in fork["legs"]}
    assert (legs[(generation, "debit")]["amount"], legs[(generation, "debit")]["balance_after"]) == \
        (100_01, 4_300_00 - 100_01)
    assert legs[(unit_accounts["generation"]["id"], "credit")]["amount"] == 50_00  # floor(surplus / 2)
    assert legs[(unit_accounts["compounding"]["id"], "credit")]["amount"] == 50_01  # the rest
    await assert_legs_readable(api, fork)

    # Without an amount, the whole remaining surplus forks.
    rest = await api.created(f"/v1/accounts/{generation}/fork", {})
    assert (rest["kind"], rest["amount"]) == ("fork", 300_00 - 100_01)
    await assert_legs_readable(api, rest)
    assert (await api.ok(f"/v1/accounts/{generation}"))["balance"] == 4_000_00
    view = await api.ok(f"/v1/portfolios/{root['id']}")
    assert sorted(u["id"] for u in view["units"]) == sorted([fork["portfolio_id"], rest["portfolio_id"]])
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert (tree["units_active"], tree["totals"]["balance"]) == (2, CAPITAL + 300_00)


async def test_a_replayed_fork_returns_the_original_operation_and_forks_once(api):
    root = await open_portfolio(api)
    generation = by_type(root)["generation"]["id"]
    await trade(api, generation, 500_00)
    key = new_key()
    first = await api.post(f"/v1/accounts/{generation}/fork", {"amount": 200_00}, key=key)
    assert first.status == 201
    again = await api.post(f"/v1/accounts/{generation}/fork", {"amount": 200_00}, key=key)
    assert again.status in (200, 201) and again.body == first.body
    assert len((await api.ok(f"/v1/portfolios/{root['id']}"))["units"]) == 1
    assert (await api.ok(f"/v1/accounts/{generation}"))["balance"] == 4_300_00


async def test_a_manual_fork_without_a_body_forks_the_whole_surplus(api):
    """`{amount?}`: every field is optional, so an empty body means the default, as it does
    for PATCH /v1/accounts/{id} and POST /v1/portfolios/{id}/merge."""
    root = await open_portfolio(api)
    generation = by_type(root)["generation"]["id"]
    await trade(api, generation, 300_00)
    reply = await api.call("POST", f"/v1/accounts/{generation}/fork", key=new_key())
    assert reply.status == 201, reply.body
    assert (reply.body["kind"], reply.body["amount"]) == ("fork", 300_00)


async def test_a_deposit_or_a_transfer_into_a_gen_acc_forks_like_a_premium(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    generation, revenue = accounts["generation"]["id"], accounts["revenue"]["id"]
    deposit = await api.created(f"/v1/accounts/{generation}/deposits", {"amount": FORK_THRESHOLD})
    assert deposit["balance_after"] == 4_000_00 + FORK_THRESHOLD
    assert len((await api.ok(f"/v1/portfolios/{root['id']}"))["units"]) == 1
    await api.created("/v1/transfers", {"from_account": revenue, "to_account": generation, "amount": FORK_THRESHOLD})
    view = await api.ok(f"/v1/portfolios/{root['id']}")
    assert len(view["units"]) == 2 and by_type(view)["generation"]["balance"] == 4_000_00
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert tree["totals"]["balance"] == CAPITAL + FORK_THRESHOLD


async def test_concurrent_premiums_each_fork_once_and_conserve_money(api):
    root = await open_portfolio(api)
    generation = by_type(root)["generation"]["id"]
    replies = await asyncio.gather(*[
        api.post(f"/v1/accounts/{generation}/trades", {"kind": "premium", "amount": FORK_THRESHOLD}, key=new_key())
        for _ in range(8)])
    assert [r.status for r in replies] == [201] * 8, [(r.status, r.body) for r in replies]
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert (tree["units_active"], tree["units_merged"]) == (8, 0)
    assert tree["totals"]["balance"] == CAPITAL + 8 * FORK_THRESHOLD
    assert (await api.ok(f"/v1/accounts/{generation}"))["balance"] == 4_000_00
    units = [node for node in tree["nodes"] if node["id"] != root["id"]]
    assert all(node["balance"] == FORK_THRESHOLD for node in units)


# -- merge -------------------------------------------------------------------------------
async def test_a_premium_that_lifts_a_unit_past_the_merge_threshold_merges_it_into_the_root(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    await trade(api, accounts["generation"]["id"], 1_000_00)
    unit_id = (await api.ok(f"/v1/portfolios/{root['id']}"))["units"][0]["id"]
    unit_accounts = by_type(await api.ok(f"/v1/portfolios/{unit_id}"))  # 500_00 each
    # A premium to the unit's Com-Acc takes the unit to the merge threshold.
    premium = await trade(api, unit_accounts["compounding"]["id"], 4_000_00)
    assert premium["balance_after"] == 4_500_00

    unit = await api.ok(f"/v1/portfolios/{unit_id}")
    assert unit["status"] == "merged" and unit["merged_at"] is not None
    assert all(a["status"] == "merged" and a["balance"] == 0 for a in unit["accounts"])
    view = await api.ok(f"/v1/portfolios/{root['id']}")
    assert by_type(view)["compounding"]["balance"] == 3_000_00 + MERGE_THRESHOLD
    assert view["units"] == [{"id": unit_id, "status": "merged", "balance": 0}]
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert (tree["units_active"], tree["units_merged"]) == (0, 1)
    assert tree["totals"]["balance"] == CAPITAL + 1_000_00 + 4_000_00
    merged = [e for e in await events(api) if e["type"] == "portfolio.merged"]
    assert len(merged) == 1
    assert (merged[0]["portfolio_id"], merged[0]["payload"]["amount"], merged[0]["payload"]["to_account"]) == \
        (unit_id, MERGE_THRESHOLD, accounts["compounding"]["id"])
    assert premium["growth"] == {"fork_id": None, "unit_id": None, "merge_id": merged[0]["correlation_id"]}


async def test_an_operator_merges_a_unit_now_and_the_units_below_it_stay(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    await trade(api, accounts["generation"]["id"], 300_00)
    fork = await api.created(f"/v1/accounts/{accounts['generation']['id']}/fork", {})
    unit_id = fork["portfolio_id"]
    unit_accounts = by_type(await api.ok(f"/v1/portfolios/{unit_id}"))  # 150_00 each
    # The unit's own Gen-Acc forks a grandchild unit.
    await trade(api, unit_accounts["generation"]["id"], 1_000_00)
    grandchild_id = (await api.ok(f"/v1/portfolios/{unit_id}"))["units"][0]["id"]
    grandchild = await api.ok(f"/v1/portfolios/{grandchild_id}")
    assert (grandchild["parent_id"], grandchild["root_id"], grandchild["depth"]) == (unit_id, root["id"], 2)

    key = new_key()
    reply = await api.post(f"/v1/portfolios/{unit_id}/merge", key=key)
    assert reply.status == 201, reply.body
    merge = reply.body
    assert GROWTH_FIELDS <= set(merge)
    assert (merge["kind"], merge["portfolio_id"], merge["amount"]) == ("merge", unit_id, 300_00)
    debits = sorted((leg["account_id"], leg["amount"]) for leg in merge["legs"] if leg["direction"] == "debit")
    credits = [(leg["account_id"], leg["amount"], leg["balance_after"]) for leg in merge["legs"]
               if leg["direction"] == "credit"]
    assert debits == sorted([(unit_accounts["generation"]["id"], 150_00), (unit_accounts["compounding"]["id"], 150_00)])
    assert credits == [(accounts["compounding"]["id"], 300_00, 3_000_00 + 300_00)]
    await assert_legs_readable(api, merge)
    again = await api.post(f"/v1/portfolios/{unit_id}/merge", key=key)
    assert again.status in (200, 201) and again.body == merge

    assert (await api.ok(f"/v1/portfolios/{unit_id}"))["status"] == "merged"
    assert (await api.ok(f"/v1/portfolios/{grandchild_id}"))["status"] == "active"
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    nodes = {node["id"]: node for node in tree["nodes"]}
    assert set(nodes) == {root["id"], unit_id, grandchild_id}
    assert nodes[grandchild_id]["parent_id"] == unit_id and nodes[grandchild_id]["balance"] == 1_000_00
    assert (tree["units_active"], tree["units_merged"]) == (1, 1)
    assert tree["totals"]["balance"] == CAPITAL + 300_00 + 1_000_00


async def test_a_deposit_or_a_transfer_into_a_unit_account_also_merges_it(api):
    root = await open_portfolio(api, capital=100_000_00)  # Gen-Acc 40_000_00, Rev-Acc 30_000_00
    accounts = by_type(root)
    generation, revenue = accounts["generation"]["id"], accounts["revenue"]["id"]
    await trade(api, generation, FORK_THRESHOLD)
    await trade(api, generation, FORK_THRESHOLD)
    first, second = [u["id"] for u in (await api.ok(f"/v1/portfolios/{root['id']}"))["units"]]
    first_com = by_type(await api.ok(f"/v1/portfolios/{first}"))["compounding"]["id"]
    second_com = by_type(await api.ok(f"/v1/portfolios/{second}"))["compounding"]["id"]
    await api.created(f"/v1/accounts/{first_com}/deposits", {"amount": MERGE_THRESHOLD - FORK_THRESHOLD})
    assert (await api.ok(f"/v1/portfolios/{first}"))["status"] == "merged"
    await api.created("/v1/transfers", {"from_account": revenue, "to_account": second_com,
                                        "amount": MERGE_THRESHOLD - FORK_THRESHOLD})
    assert (await api.ok(f"/v1/portfolios/{second}"))["status"] == "merged"
    view = await api.ok(f"/v1/portfolios/{root['id']}")
    assert by_type(view)["compounding"]["balance"] == 30_000_00 + 2 * MERGE_THRESHOLD
    tree = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert (tree["units_active"], tree["units_merged"]) == (0, 2)
    assert tree["totals"]["balance"] == 100_000_00 + 2 * FORK_THRESHOLD + (MERGE_THRESHOLD - FORK_THRESHOLD)


async def test_concurrent_merges_of_one_unit_merge_it_once(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    await trade(api, accounts["generation"]["id"], FORK_THRESHOLD)
    unit_id = (await api.ok(f"/v1/portfolios/{root['id']}"))["units"][0]["id"]
    replies = await asyncio.gather(*[api.post(f"/v1/portfolios/{unit_id}/merge", key=new_key()) for _ in range(6)])
    merged = [r for r in replies if r.status == 201]
    assert len(merged) == 1, [(r.status, r.body) for r in replies]
    for reply in replies:
        if reply.status != 201:
            assert_error(reply, 409, "merge_not_allowed")
    assert merged[0].body["amount"] == FORK_THRESHOLD
    assert by_type(await api.ok(f"/v1/portfolios/{root['id']}"))["compounding"]["balance"] == \
        3_000_00 + FORK_THRESHOLD
    assert [e["type"] for e in await events(api)].count("portfolio.merged") == 1


# -- reinvestment ------------------------------------------------------------------------
async def test_reinvestment_allocates_net_trade_income_75_25_and_moves_no_money(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    revenue, compounding, generation = (accounts[t]["id"] for t in ("revenue", "compounding", "generation"))
    await trade(api, revenue, 200_00)
    await trade(api, revenue, 50_00, kind="loss")
    await trade(api, compounding, 100_00)
    await trade(api, generation, 100_00)
    unit = await api.created(f"/v1/accounts/{generation}/fork", {})
    unit_compounding = by_type(await api.ok(f"/v1/portfolios/{unit['portfolio_id']}"))["compounding"]["id"]
    before = await api.ok(f"/v1/portfolios/{root['id']}/tree")

    reply = await api.post(f"/v1/portfolios/{root['id']}/reinvest", {"quarter": QUARTER}, key=new_key())
    assert reply.status == 200, reply.body
    result = reply.body
    assert set(result) == {"portfolio_id", "quarter", "accounts", "skipped"}
    assert (result["portfolio_id"], result["quarter"], result["skipped"]) == (root["id"], QUARTER, [])
    assert sorted(result["accounts"], key=lambda a: a["account_id"]) == sorted([
        {"account_id": revenue, "net_income": 150_00, "contracts": 112_50, "leaps": 37_50},
        {"account_id": compounding, "net_income": 100_00, "contracts": 75_00, "leaps": 25_00},
        {"account_id": unit_compounding, "net_income": 0, "contracts": 0, "leaps": 0},
    ], key=lambda a: a["account_id"])
    assert (await api.ok(f"/v1/accounts/{revenue}"))["allocations"] == {"contracts": 112_50, "leaps": 37_50}
    assert (await api.ok(f"/v1/accounts/{compounding}"))["allocations"] == {"contracts": 75_00, "leaps": 25_00}
    assert (await api.ok(f"/v1/accounts/{generation}"))["allocations"] == {"contracts": 0, "leaps": 0}
    after = await api.ok(f"/v1/portfolios/{root['id']}/tree")
    assert after["totals"] == before["totals"]
    reinvested = [e for e in await events(api) if e["type"] == "account.reinvested"]
    assert sorted(e["account_id"] for e in reinvested) == sorted([revenue, compounding, unit_compounding])

    again = await api.snapshot()
    assert_error(await api.post(f"/v1/portfolios/{root['id']}/reinvest", {"quarter": QUARTER}), 409,
                 "already_reinvested")
    assert await api.snapshot() == again


async def test_concurrent_reinvestments_of_one_quarter_apply_once(api):
    root = await open_portfolio(api)
    revenue = by_type(root)["revenue"]["id"]
    await trade(api, revenue, 400_00)
    replies = await asyncio.gather(*[api.post(f"/v1/portfolios/{root['id']}/reinvest", {"quarter": QUARTER},
                                              key=new_key()) for _ in range(4)])
    done = [r for r in replies if r.status == 200]
    assert len(done) == 1, [(r.status, r.body) for r in replies]
    for reply in replies:
        if reply.status != 200:
            assert_error(reply, 409, "already_reinvested")
    assert (await api.ok(f"/v1/accounts/{revenue}"))["allocations"] == {"contracts": 300_00, "leaps": 100_00}


# -- projections -------------------------------------------------------------------------
def check_projection(projection: dict, initial_capital: int, weeks: int, include_weeks: bool = True) -> None:
    assert {"weeks", "years", "initial_capital", "units_created", "units_merged", "final_total_value"} <= \
        set(projection)
    years = projection["years"]
    assert [y["year"] for y in years] == list(range(1, math.ceil(weeks / 52) + 1))
    for year in years:
        assert YEAR_FIELDS <= set(year), year
        assert year["total_value"] == year["generation"] + year["revenue"] + year["compounding"]
    # Forks and merges move money; only trade results change the total.
    assert projection["final_total_value"] == years[-1]["total_value"] == \
        initial_capital + sum(y["income"] for y in years)
    assert sum(y["forks"] for y in years) == projection["units_created"]
    assert sum(y["merges"] for y in years) == projection["units_merged"]
    assert years[-1]["active_units"] == projection["units_created"] - projection["units_merged"]
    if not include_weeks:
        assert projection["weeks"] == []
        return
    series = projection["weeks"]
    assert [w["week"] for w in series] == list(range(1, weeks + 1))
    for index, year in enumerate(years):
        chunk = series[index * 52:(index + 1) * 52]
        assert year["income"] == sum(w["income"] for w in chunk)
        assert year["forks"] == sum(w["forks"] for w in chunk) and year["merges"] == sum(w["merges"] for w in chunk)
        for name in ("total_value", "active_units", "generation", "revenue", "compounding"):
            assert year[name] == chunk[-1][name]


async def test_a_projection_returns_a_weekly_series_and_a_yearly_table(api):
    body = {"initial_capital": 100_000_00, "weeks": 60, "weekly_return_bps": RATES}
    reply = await api.post("/v1/projections", body)
    assert reply.status == 200, reply.body
    projection = reply.body
    check_projection(projection, 100_000_00, 60)
    assert len(projection["years"]) == 2  # 52 weeks and a partial year of 8
    # Week 1: balance * (1 - 5% buffer) * rate, per account (40/30/30 split).
    first = projection["weeks"][0]
    assert (first["generation"], first["revenue"], first["compounding"]) == (40_570_00, 30_285_00, 30_142_50)
    assert (first["income"], first["total_value"], first["forks"]) == (997_50, 100_997_50, 0)
    # The app's small fork threshold applies: the Gen-Acc forks in week 2.
    assert projection["weeks"][1]["forks"] == 1 and projection["units_created"] > 1
    # A merge threshold a unit reaches soon after its fork: units merge back.
    merging = await api.post("/v1/projections", {**body, "merge_threshold_cents": 1_200_00})
    assert merging.status == 200, merging.body
    check_projection(merging.body, 100_000_00, 60)
    assert merging.body["units_merged"] > 0

    without = await api.post("/v1/projections", {**body, "include_weeks": False, "start_date": "2026-01-05"})
    assert without.status == 200, without.body
    check_projection(without.body, 100_000_00, 60, include_weeks=False)
    assert without.body["years"] == projection["years"]


async def test_projection_overrides_replace_the_configured_rules_for_one_run(api):
    configured = await api.post("/v1/projections", {"initial_capital": 100_000_00, "weeks": 52,
                                                    "weekly_return_bps": RATES})
    assert configured.status == 200 and configured.body["units_created"] > 0  # the app's $1,000 threshold
    body = {"initial_capital": 100_000_00, "weeks": 52, "weekly_return_bps": RATES,
            "fork_threshold_cents": 50_000_00, "merge_threshold_cents": 500_000_00}
    defaults = (await api.post("/v1/projections", body)).body
    check_projection(defaults, 100_000_00, 52)
    assert defaults["units_created"] == 0  # $50,000 of surplus takes more than a year here

    no_buffer = await api.post("/v1/projections", {**body, "weeks": 1, "cash_buffer_bps": {"generation": 0}})
    assert no_buffer.status == 200, no_buffer.body
    assert no_buffer.body["weeks"][0]["generation"] == 40_000_00 + 600_00
    assert no_buffer.body["weeks"][0]["revenue"] == 30_285_00  # other types keep the configured buffer

    shares = await api.post("/v1/projections", {**body, "weeks": 1,
                                                "capital_share_bps": {"generation": 5000, "revenue": 2500}})
    assert shares.status == 200, shares.body
    week = shares.body["weeks"][0]
    assert (week["generation"], week["revenue"], week["compounding"]) == \
        (50_000_00 + 712_50, 25_000_00 + 237_50, 25_000_00 + 118_75)


# -- events ------------------------------------------------------------------------------
async def test_the_event_feed_pages_in_commit_order_with_next_after(api):
    root = await open_portfolio(api)
    await trade(api, by_type(root)["generation"]["id"], 1_000_00)  # forks
    everything = await api.ok("/v1/events?limit=500")
    items = everything["items"]
    assert everything["next_after"] == items[-1]["seq"]
    for item in items:
        assert {"seq", "type", "payload", "account_id", "portfolio_id", "correlation_id", "created_at"} <= set(item)
        assert isinstance(item["payload"], dict)
    seqs = [item["seq"] for item in items]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    types = [item["type"] for item in items]
    # The opening, then the premium, then the fork: one event for the unit (before its
    # accounts) carrying all three legs of the fork.
    assert types == ["portfolio.opened"] + ["account.opened"] * 3 + ["transaction.posted"] * 3 + \
        ["transaction.posted"] + ["portfolio.forked"] + ["account.opened"] * 2
    forked = items[types.index("portfolio.forked")]["payload"]
    assert [leg["direction"] for leg in forked["legs"]] == ["debit", "credit", "credit"]
    assert forked["amount"] == sum(leg["amount"] for leg in forked["legs"] if leg["direction"] == "credit")
    opened = items[0]
    assert opened["portfolio_id"] == root["id"] and opened["payload"]["portfolio"]["id"] == root["id"]
    posted = items[4]
    assert posted["payload"]["kind"] == "deposit" and posted["payload"]["memo"] == "initial capital"

    paged, after = [], 0
    for _ in range(100):
        page = await api.ok(f"/v1/events?after={after}&limit=3")
        assert len(page["items"]) <= 3
        if not page["items"]:
            assert page["next_after"] == after
            break
        assert page["next_after"] == page["items"][-1]["seq"]
        paged.extend(page["items"])
        after = page["next_after"]
    assert paged == items
    tail = await api.ok(f"/v1/events?after={seqs[3]}&limit=2")
    assert [item["seq"] for item in tail["items"]] == seqs[4:6]
    default = await api.ok("/v1/events")
    assert default["items"] == items[:50]


# -- supervision -------------------------------------------------------------------------
async def test_the_supervisor_status_shows_each_portfolio_with_its_accounts(api):
    root = await open_portfolio(api)
    accounts = by_type(root)
    await api.created(f"/v1/accounts/{accounts['revenue']['id']}/deposits", {"amount": 1_00})
    await trade(api, accounts["generation"]["id"], 1_000_00)
    unit_id = (await api.ok(f"/v1/portfolios/{root['id']}"))["units"][0]["id"]
    unit_compounding = by_type(await api.ok(f"/v1/portfolios/{unit_id}"))["compounding"]["id"]
    await trade(api, unit_compounding, 1_00)

    status = await api.ok("/v1/supervisor/status")
    assert status["root"] == "engine"
    assert status["restarts_total"] == 0 and status["quarantined"] == {}
    assert isinstance(status["mailbox_depth_max"], int) and status["resident_accounts"] >= 3
    nodes = {node["id"]: node for node in status["supervisors"]}
    assert {root["id"], unit_id} <= set(nodes)
    portfolio, unit = nodes[root["id"]], nodes[unit_id]
    assert (portfolio["kind"], portfolio["parent_id"], portfolio["status"], portfolio["restarts"]) == \
        ("portfolio", None, "active", 0)
    assert (unit["kind"], unit["parent_id"]) == ("unit", root["id"])
    assert unit_id in portfolio["units"] and root["id"] in status["top_level"]
    assert sorted(a["account_id"] for a in portfolio["accounts"]) == sorted(a["id"] for a in root["accounts"])
    for node in (portfolio, unit):
        for child in node["accounts"]:
            assert child["state"] in ("running", "passivated"), child
            assert child["restarts"] == 0 and isinstance(child["mailbox_depth"], int)
    running = {child["account_id"]: child["state"] for child in portfolio["accounts"]}
    assert running[accounts["revenue"]["id"]] == running[accounts["generation"]["id"]] == "running"


async def test_a_crashed_account_answers_503_restarts_and_a_retry_with_the_same_key_succeeds(fault_api):
    api = fault_api
    root = await open_portfolio(api)
    revenue = by_type(root)["revenue"]["id"]
    await api.created(f"/v1/accounts/{revenue}/deposits", {"amount": 1_00})
    armed = await api.post("/v1/admin/faults", {"account_id": revenue, "fault": "crash"})
    assert armed.status == 202, armed.body
    assert armed.body == {"account_id": revenue, "fault": "crash", "armed": True}

    key = new_key()
    failed = await api.post(f"/v1/accounts/{revenue}/deposits", {"amount": 500}, key=key)
    assert failed.status == 503, failed.body
    assert_error(failed, 503, failed.body["error"]["code"])
    assert failed.headers.get("Retry-After")

    async def restarted():
        status = await api.ok("/v1/supervisor/status")
        child = supervised_account(status, root["id"], revenue)
        return status if child and child["restarts"] == 1 and child["last_restart_latency_ms"] is not None \
            else None

    status = await eventually(restarted, "the supervisor to restart the account")
    assert status["restarts_total"] >= 1
    child = supervised_account(status, root["id"], revenue)
    assert "injected" in child["last_failure"] and child["state"] in ("running", "stale", "passivated")

    retried = await api.post(f"/v1/accounts/{revenue}/deposits", {"amount": 500}, key=key)
    assert retried.status == 201, retried.body
    assert retried.body["balance_after"] == 3_000_00 + 1_00 + 500
    again = await api.post(f"/v1/accounts/{revenue}/deposits", {"amount": 500}, key=key)
    assert again.status in (200, 201) and again.body == retried.body
    assert (await api.ok(f"/v1/accounts/{revenue}"))["balance"] == 3_000_00 + 1_00 + 500
    history = await api.pages(f"/v1/accounts/{revenue}/transactions")
    assert [t["amount"] for t in history] == [500, 1_00, 3_000_00]


async def test_an_account_that_keeps_failing_is_quarantined_until_an_operator_releases_it(fault_api):
    api = fault_api
    account = await api.create_account("revenue", funded=1_000)
    account_id = account["id"]
    status = await api.ok("/v1/supervisor/status")
    restarts_max = status["restart_policy"]["restarts_max"]
    assert_error(await api.post(f"/v1/admin/quarantine/{account_id}/release"), 404, "not_found")

    for failure in range(1, restarts_max + 2):
        armed = await api.post("/v1/admin/faults", {"account_id": account_id, "fault": "crash"})
        assert armed.status == 202, (failure, armed.body)
        failed = await api.post(f"/v1/accounts/{account_id}/deposits", {"amount": 1})
        assert failed.status == 503, (failure, failed.body)

        async def seen(failure=failure):
            status = await api.ok("/v1/supervisor/status")
            child = supervised_account(status, "standalone", account_id)
            if failure <= restarts_max:
                return child is not None and child["restarts"] == failure and child["state"] != "quarantined"
            return account_id in status["quarantined"] and child is not None and child["state"] == "quarantined"

        await eventually(seen, f"failure {failure} to be handled")

    refused = await api.post(f"/v1/accounts/{account_id}/deposits", {"amount": 1})
    assert_error(refused, 503, "account_quarantined")
    assert refused.headers.get("Retry-After")
    released = await api.post(f"/v1/admin/quarantine/{account_id}/release")
    assert released.status == 200, released.body
    assert released.body["id"] == account_id and released.body["balance"] == 1_000
    status = await api.ok("/v1/supervisor/status")
    assert account_id not in status["quarantined"]
    deposit = await api.created(f"/v1/accounts/{account_id}/deposits", {"amount": 1})
    assert deposit["balance_after"] == 1_001


async def test_fault_injection_refuses_bad_input_without_a_500(fault_api):
    api = fault_api
    account = await api.create_account("revenue", funded=1_000)
    before = await api.snapshot()
    assert_error(await api.post("/v1/admin/faults", {"account_id": "acc_nope", "fault": "crash"}), 404, "not_found")
    assert_error(await api.post("/v1/admin/faults", {"account_id": account["id"], "fault": "explode"}), 422,
                 "validation_failed", "fault")
    assert_error(await api.post("/v1/admin/faults", {"fault": "crash"}), 422, "validation_failed", "account_id")
    assert_error(await api.post("/v1/admin/faults", {"account_id": account["id"]}, token=None), 401, "unauthorized")
    assert await api.snapshot() == before
    # Nothing was armed: the account still works.
    assert (await api.created(f"/v1/accounts/{account['id']}/deposits", {"amount": 1}))["balance_after"] == 1_001


# -- the API description -----------------------------------------------------------------
async def test_the_openapi_document_lists_every_route_in_the_table(api):
    document = await api.get("/openapi.json", token=None)
    assert document.status == 200 and document.body["openapi"].startswith("3.")
    paths = document.body["paths"]
    for route in ROUTES:
        assert route.path in paths, route.path
        operation = paths[route.path].get(route.method.lower())
        assert operation is not None, (route.method, route.path)
        assert str(route.status) in operation["responses"], (route.method, route.path, route.status)
        if route.request is not None:
            assert "requestBody" in operation, (route.method, route.path)
    listed = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    assert listed == {(route.method, route.path) for route in ROUTES}


# -- bad input, table-driven -------------------------------------------------------------
@dataclass
class World:
    """A root portfolio with an active unit (forked by a premium), a merged unit, a Gen-Acc
    surplus of 200_00 below the fork threshold, and this quarter already reinvested; and a
    funded standalone Gen-Acc."""

    root: str
    unit: str
    merged: str
    gen: str
    rev: str
    com: str
    unit_gen: str
    unit_com: str
    merged_gen: str
    standalone: str

    def ids(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@pytest_asyncio.fixture(loop_scope="session")
async def world(api) -> World:
    root = await open_portfolio(api, name="World")
    accounts = by_type(root)
    gen, rev, com = (accounts[t]["id"] for t in ("generation", "revenue", "compounding"))
    await trade(api, gen, FORK_THRESHOLD)  # forks the active unit
    await trade(api, gen, 300_00)
    merged = (await api.created(f"/v1/accounts/{gen}/fork", {"amount": 100_00}))["portfolio_id"]
    await api.created(f"/v1/portfolios/{merged}/merge", {})
    await trade(api, rev, 100_00)
    assert (await api.post(f"/v1/portfolios/{root['id']}/reinvest", {"quarter": QUARTER})).status == 200
    units = (await api.ok(f"/v1/portfolios/{root['id']}"))["units"]
    unit = next(u["id"] for u in units if u["status"] == "active")
    unit_accounts = by_type(await api.ok(f"/v1/portfolios/{unit}"))
    merged_accounts = by_type(await api.ok(f"/v1/portfolios/{merged}"))
    standalone = await api.create_account("generation", funded=5_000_00)
    assert (await api.ok(f"/v1/accounts/{gen}"))["balance"] == 4_000_00 + 200_00
    return World(root=root["id"], unit=unit, merged=merged, gen=gen, rev=rev, com=com,
                 unit_gen=unit_accounts["generation"]["id"], unit_com=unit_accounts["compounding"]["id"],
                 merged_gen=merged_accounts["generation"]["id"], standalone=standalone["id"])


async def growth_snapshot(api: Api, world: World) -> dict:
    """Everything a bad request must leave alone: every account and its history, the
    world's fork tree (balances, statuses, allocations) and the event feed."""
    return {"accounts": await api.snapshot(), "tree": await api.ok(f"/v1/portfolios/{world.root}/tree"),
            "last_event": await last_event_seq(api)}


PORTFOLIO = {"name": "P", "owner": "ann", "initial_capital": CAPITAL}
PROJECTION = {"initial_capital": 100_000_00, "weeks": 52, "weekly_return_bps": RATES}
REINVEST = "/v1/portfolios/{root}/reinvest"


def without(body: dict, name: str) -> dict:
    return {key: value for key, value in body.items() if key != name}


def projection_case(case_id: str, body: dict, error_field: str | None = None) -> Case:
    return Case(f"projection-{case_id}", "POST", "/v1/projections", 422, "validation_failed", body,
                error_field=error_field)


GROWTH_CASES: list[Case] = [
    # POST /v1/portfolios
    *[Case(f"portfolio-capital-{name}", "POST", "/v1/portfolios", 422, "validation_failed",
           {**PORTFOLIO, "initial_capital": capital}, error_field="initial_capital")
      for name, capital in [("float", 1.5), ("integral-float", 100.0), ("zero", 0), ("negative", -5),
                            ("string", "1000"), ("bool", True), ("null", None), ("too-large", AMOUNT_MAX + 1)]],
    Case("portfolio-missing-capital", "POST", "/v1/portfolios", 422, "validation_failed",
         without(PORTFOLIO, "initial_capital"), error_field="initial_capital"),
    Case("portfolio-missing-owner", "POST", "/v1/portfolios", 422, "validation_failed", without(PORTFOLIO, "owner"),
         error_field="owner"),
    Case("portfolio-empty-owner", "POST", "/v1/portfolios", 422, "validation_failed", {**PORTFOLIO, "owner": ""},
         error_field="owner"),
    Case("portfolio-missing-name", "POST", "/v1/portfolios", 422, "validation_failed", without(PORTFOLIO, "name"),
         error_field="name"),
    Case("portfolio-unknown-field", "POST", "/v1/portfolios", 422, "validation_failed",
         {**PORTFOLIO, "currency": "USD"}, error_field="currency"),
    Case("portfolio-opened-tomorrow", "POST", "/v1/portfolios", 422, "validation_failed",
         {**PORTFOLIO, "opened_on": TOMORROW}, error_field="opened_on"),
    Case("portfolio-opened-far-future", "POST", "/v1/portfolios", 422, "validation_failed",
         {**PORTFOLIO, "opened_on": "2999-01-01"}, error_field="opened_on"),
    *[Case(f"portfolio-opened-on-{name}", "POST", "/v1/portfolios", 422, "validation_failed",
           {**PORTFOLIO, "opened_on": value}, error_field="opened_on")
      for name, value in [("words", "last week"), ("no-such-day", "2026-02-30"), ("slashes", "2026/01/05"),
                          ("number", 20260105)]],
    Case("portfolio-body-is-array", "POST", "/v1/portfolios", 422, "validation_failed", [PORTFOLIO]),
    Case("portfolio-malformed-json", "POST", "/v1/portfolios", 400, "malformed_json", raw=b'{"name": ',
         headers={"Content-Type": "application/json"}),
    Case("portfolio-no-token", "POST", "/v1/portfolios", 401, "unauthorized", PORTFOLIO, token=None),
    # unknown portfolios
    Case("get-unknown-portfolio", "GET", "/v1/portfolios/prt_nope", 404, "not_found"),
    Case("tree-unknown-portfolio", "GET", "/v1/portfolios/prt_nope/tree", 404, "not_found"),
    Case("merge-unknown-portfolio", "POST", "/v1/portfolios/prt_nope/merge", 404, "not_found"),
    Case("reinvest-unknown-portfolio", "POST", "/v1/portfolios/prt_nope/reinvest", 404, "not_found",
         {"quarter": QUARTER}),
    Case("get-overlong-portfolio-id", "GET", "/v1/portfolios/" + "p" * 65, 404, "not_found"),
    Case("get-portfolio-by-account-id", "GET", "/v1/portfolios/{gen}", 404, "not_found"),
    # merge refusals
    Case("merge-root-portfolio", "POST", "/v1/portfolios/{root}/merge", 409, "merge_not_allowed"),
    Case("merge-merged-unit", "POST", "/v1/portfolios/{merged}/merge", 409, "merge_not_allowed"),
    Case("merge-unknown-field", "POST", "/v1/portfolios/{unit}/merge", 422, "validation_failed", {"now": True},
         error_field="now"),
    # reinvest
    *[Case(f"reinvest-quarter-{name}", "POST", REINVEST, 422, "validation_failed", {"quarter": quarter},
           error_field="quarter")
      for name, quarter in [("no-dash", "2026Q4"), ("fifth", "2026-Q5"), ("zeroth", "2026-Q0"), ("number", 2026),
                            ("empty", ""), ("null", None), ("lowercase", "2026-q4")]],
    Case("reinvest-missing-quarter", "POST", REINVEST, 422, "validation_failed", {}, error_field="quarter"),
    Case("reinvest-future-quarter", "POST", REINVEST, 422, "validation_failed", {"quarter": NEXT_QUARTER},
         error_field="quarter"),
    Case("reinvest-far-future-quarter", "POST", REINVEST, 422, "validation_failed", {"quarter": "2999-Q1"},
         error_field="quarter"),
    Case("reinvest-twice", "POST", REINVEST, 409, "already_reinvested", {"quarter": QUARTER}),
    Case("reinvest-unknown-field", "POST", REINVEST, 422, "validation_failed", {"quarter": QUARTER, "all": True},
         error_field="all"),
    # fork
    Case("fork-standalone-gen-acc", "POST", "/v1/accounts/{standalone}/fork", 409, "fork_not_allowed", {}),
    Case("fork-standalone-gen-acc-amount", "POST", "/v1/accounts/{standalone}/fork", 409, "fork_not_allowed",
         {"amount": 1_00}),
    Case("fork-revenue", "POST", "/v1/accounts/{rev}/fork", 409, "fork_not_allowed", {}),
    Case("fork-compounding", "POST", "/v1/accounts/{com}/fork", 409, "fork_not_allowed", {"amount": 1}),
    Case("fork-above-surplus", "POST", "/v1/accounts/{gen}/fork", 409, "fork_not_allowed", {"amount": 200_01}),
    Case("fork-without-surplus", "POST", "/v1/accounts/{unit_gen}/fork", 409, "fork_not_allowed", {}),
    Case("fork-merged-gen-acc", "POST", "/v1/accounts/{merged_gen}/fork", 409, "account_not_active", {}),
    Case("fork-unknown-account", "POST", "/v1/accounts/acc_nope/fork", 404, "not_found", {}),
    *[Case(f"fork-amount-{name}", "POST", "/v1/accounts/{gen}/fork", 422, "validation_failed", {"amount": amount},
           error_field="amount")
      for name, amount in [("zero", 0), ("negative", -1), ("float", 1.5), ("string", "100"), ("bool", True)]],
    Case("fork-unknown-field", "POST", "/v1/accounts/{gen}/fork", 422, "validation_failed", {"units": 2},
         error_field="units"),
    # Com-Accs refuse withdrawals and transfers out (root and unit alike)
    Case("withdraw-from-root-com-acc", "POST", "/v1/accounts/{com}/withdrawals", 409, "withdrawal_not_allowed",
         {"amount": 1}),
    Case("withdraw-from-unit-com-acc", "POST", "/v1/accounts/{unit_com}/withdrawals", 409, "withdrawal_not_allowed",
         {"amount": 1}),
    Case("transfer-out-of-root-com-acc", "POST", "/v1/transfers", 409, "withdrawal_not_allowed",
         lambda ids: {"from_account": ids["com"], "to_account": ids["rev"], "amount": 1}),
    Case("transfer-out-of-unit-com-acc", "POST", "/v1/transfers", 409, "withdrawal_not_allowed",
         lambda ids: {"from_account": ids["unit_com"], "to_account": ids["gen"], "amount": 1}),
    Case("deposit-to-merged-account", "POST", "/v1/accounts/{merged_gen}/deposits", 409, "account_not_active",
         {"amount": 1}),
    # projections
    projection_case("weeks-zero", {**PROJECTION, "weeks": 0}, "weeks"),
    projection_case("weeks-huge", {**PROJECTION, "weeks": 100_000}, "weeks"),
    projection_case("weeks-negative", {**PROJECTION, "weeks": -1}, "weeks"),
    projection_case("weeks-float", {**PROJECTION, "weeks": 52.5}, "weeks"),
    projection_case("weeks-string", {**PROJECTION, "weeks": "52"}, "weeks"),
    projection_case("missing-weeks", without(PROJECTION, "weeks"), "weeks"),
    projection_case("rate-too-high", {**PROJECTION, "weekly_return_bps": {**RATES, "generation": 10_001}},
                    "weekly_return_bps.generation"),
    projection_case("rate-too-low", {**PROJECTION, "weekly_return_bps": {**RATES, "revenue": -10_001}},
                    "weekly_return_bps.revenue"),
    projection_case("rate-float", {**PROJECTION, "weekly_return_bps": {**RATES, "compounding": 0.5}},
                    "weekly_return_bps.compounding"),
    projection_case("rate-string", {**PROJECTION, "weekly_return_bps": {**RATES, "generation": "150"}},
                    "weekly_return_bps.generation"),
    projection_case("rate-unknown-type", {**PROJECTION, "weekly_return_bps": {**RATES, "bonds": 10}},
                    "weekly_return_bps.bonds"),
    projection_case("rates-not-an-object", {**PROJECTION, "weekly_return_bps": 150}, "weekly_return_bps"),
    projection_case("missing-rates", without(PROJECTION, "weekly_return_bps"), "weekly_return_bps"),
    projection_case("unknown-field", {**PROJECTION, "currency": "USD"}, "currency"),
    projection_case("capital-zero", {**PROJECTION, "initial_capital": 0}, "initial_capital"),
    projection_case("capital-float", {**PROJECTION, "initial_capital": 1.5}, "initial_capital"),
    projection_case("missing-capital", without(PROJECTION, "initial_capital"), "initial_capital"),
    projection_case("fork-threshold-zero", {**PROJECTION, "fork_threshold_cents": 0}, "fork_threshold_cents"),
    projection_case("merge-threshold-negative", {**PROJECTION, "merge_threshold_cents": -1}, "merge_threshold_cents"),
    projection_case("include-weeks-string", {**PROJECTION, "include_weeks": "yes"}, "include_weeks"),
    projection_case("start-date-malformed", {**PROJECTION, "start_date": "soon"}, "start_date"),
    projection_case("cash-buffer-too-high", {**PROJECTION, "cash_buffer_bps": {"generation": 10_001}}),
    projection_case("cash-buffer-unknown-type", {**PROJECTION, "cash_buffer_bps": {"bonds": 100}}, "cash_buffer_bps"),
    projection_case("capital-shares-over-100-percent",
                    {**PROJECTION, "capital_share_bps": {"generation": 6000, "revenue": 6000}}, "capital_share_bps"),
    projection_case("body-is-null", None),
    Case("projection-no-token", "POST", "/v1/projections", 401, "unauthorized", PROJECTION, token=None),
    # events
    *[Case(f"events-{name}", "GET", f"/v1/events?{query}", 422, "validation_failed", error_field=field_name)
      for name, query, field_name in [("after-negative", "after=-1", "after"), ("after-word", "after=abc", "after"),
                                      ("after-float", "after=1.5", "after"), ("after-empty", "after=", "after"),
                                      ("limit-zero", "limit=0", "limit"), ("limit-too-large", "limit=501", "limit"),
                                      ("limit-word", "limit=abc", "limit")]],
    # admin routes with fault injection off
    Case("faults-off", "POST", "/v1/admin/faults", 404, "not_found",
         lambda ids: {"account_id": ids["rev"], "fault": "crash"}),
    Case("faults-off-bad-body", "POST", "/v1/admin/faults", 404, "not_found", {"fault": "explode"}),
    Case("release-not-quarantined", "POST", "/v1/admin/quarantine/{rev}/release", 404, "not_found"),
    Case("release-unknown-account", "POST", "/v1/admin/quarantine/acc_nope/release", 404, "not_found"),
    Case("status-no-token", "GET", "/v1/supervisor/status", 401, "unauthorized", token=None),
]


@pytest.mark.parametrize("case", GROWTH_CASES, ids=[case.id for case in GROWTH_CASES])
async def test_bad_growth_input_is_refused_with_the_error_shape_and_changes_nothing(api, world, case):
    ids = world.ids()
    body = case.body(ids) if callable(case.body) else case.body
    before = await growth_snapshot(api, world)
    reply = await api.call(case.method, case.path.format(**ids), body, data=case.raw, headers=case.headers,
                           token=case.token, key=case.key)
    assert_error(reply, case.status, case.code, case.error_field)
    assert await growth_snapshot(api, world) == before


async def test_fault_injection_is_not_a_route_when_it_is_off(api, world):
    """Even a well-formed request for a real account: 404, and the account keeps working."""
    reply = await api.post("/v1/admin/faults", {"account_id": world.rev, "fault": "crash"}, key=new_key())
    assert_error(reply, 404, "not_found")
    deposit = await api.created(f"/v1/accounts/{world.rev}/deposits", {"amount": 1})
    assert deposit["balance_after"] == 3_000_00 + 100_00 + 1

