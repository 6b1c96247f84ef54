"""GET /v1/supervisor/status: the supervision tree as operators see it."""
from __future__ import annotations

import asyncio

from actors.account import Reply
from actors.supervisor import STANDALONE, Snapshot

SUPERVISORS_SHOWN_MAX = 500
ACCOUNTS_SHOWN_MAX = 200


async def _snapshot(engine, supervisor_id: str, ref) -> dict:
    future = engine._loop.create_future()
    ref.tell(Snapshot(Reply(engine._loop, future)))
    try:
        return await asyncio.wait_for(future, timeout=2.0)
    except asyncio.TimeoutError:
        return {"restarts": {}, "quarantined": {}, "last_failure": {}, "last_restart_latency_ms": {},
                "unresponsive": True}


async def supervisor_tree(engine) -> dict:
    """Each supervisor with its accounts (running, passivated or quarantined, restarts,
    mailbox depth) and its resident child units; the root of the tree is the engine."""
    supervisor_ids = sorted(engine.supervisors)[:SUPERVISORS_SHOWN_MAX]
    quarantined = dict(engine.registry.quarantined)
    snapshots = await asyncio.gather(*[_snapshot(engine, i, engine.supervisors[i]) for i in supervisor_ids])
    portfolio_ids = [i for i in supervisor_ids if i != STANDALONE]
    portfolios = {}
    if portfolio_ids:
        rows = await engine.store.fetch("SELECT id, parent_id, root_id, status, generation_account_id, "
                                        "revenue_account_id, compounding_account_id FROM portfolios "
                                        "WHERE id = ANY($1::text[])", portfolio_ids)
        portfolios = {row["id"]: row for row in rows}
    resident_by_portfolio: dict[str, list] = {}
    for account_id, entry in engine.registry.resident.items():
        resident_by_portfolio.setdefault(entry.actor.committed.portfolio_id or STANDALONE, []).append(entry)
    nodes = []
    for supervisor_id, snapshot in zip(supervisor_ids, snapshots):
        row = portfolios.get(supervisor_id)
        nodes.append(_node(engine, supervisor_id, row, snapshot, resident_by_portfolio.get(supervisor_id, [])))
    shown = {node["id"] for node in nodes}
    for node in nodes:
        node["units"] = [n["id"] for n in nodes if n["parent_id"] == node["id"]]
    return {
        "root": "engine",
        "supervisors": nodes,
        "top_level": [n["id"] for n in nodes if n["parent_id"] is None or n["parent_id"] not in shown],
        "supervisors_total": len(engine.supervisors),
        "truncated": len(engine.supervisors) > len(nodes),
        "resident_accounts": len(engine.registry),
        "resident_accounts_max": engine.registry.resident_max,
        "quarantined": quarantined,
        "restarts_total": sum(sum(s["restarts"].values()) for s in snapshots),
        "mailbox_depth_max": max((e.actor.mailbox_depth() for e in engine.registry.resident.values()), default=0),
        "operations_in_flight": engine.admission.in_flight,
        "write_queue_depth": engine.writer.queue.qsize(),
        "database_healthy": engine.writer.healthy,
        "restart_policy": {"restarts_max": engine.supervision.policy.restarts_max,
                           "window_s": engine.supervision.policy.window_s},
        "webhooks": await engine.webhooks.status(),
    }


def _node(engine, supervisor_id: str, row, snapshot: dict, resident: list) -> dict:
    running = {e.account_id: e for e in resident}
    if row is not None:
        account_ids = [row[c] for c in ("generation_account_id", "revenue_account_id", "compounding_account_id")
                       if row[c] is not None]
    else:
        account_ids = sorted(running)[:ACCOUNTS_SHOWN_MAX]
    # An account both restarted and quarantined is listed once.
    account_ids += [a for a in dict.fromkeys(list(snapshot["restarts"]) + list(snapshot["quarantined"]))
                    if a not in account_ids]
    children = []
    for account_id in account_ids[:ACCOUNTS_SHOWN_MAX]:
        entry = running.get(account_id)
        if account_id in engine.registry.quarantined:
            state = "quarantined"
        elif entry is not None:
            state = "stale" if entry.actor.stale else "running"
        else:
            state = "passivated"
        children.append({
            "account_id": account_id, "state": state, "restarts": snapshot["restarts"].get(account_id, 0),
            "mailbox_depth": entry.actor.mailbox_depth() if entry is not None else 0,
            "in_flight": len(entry.actor.pending) if entry is not None else 0,
            "last_failure": snapshot["last_failure"].get(account_id),
            "last_restart_latency_ms": snapshot["last_restart_latency_ms"].get(account_id)})
    return {
        "id": supervisor_id,
        "kind": "standalone" if row is None else ("unit" if row["parent_id"] else "portfolio"),
        "parent_id": row["parent_id"] if row is not None else None,
        "status": row["status"] if row is not None else "active",
        "accounts": children,
        "resident": sum(1 for c in children if c["state"] in ("running", "stale")),
        "passivated": sum(1 for c in children if c["state"] == "passivated"),
        "restarts": sum(snapshot["restarts"].values()),
        "quarantined": sorted(snapshot["quarantined"]),
    }
