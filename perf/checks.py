"""After a session, read the database itself: every balance equals its entries, the
internal movements (transfers, forks, merges) net to zero, and everything that was
acknowledged is there. A benchmark whose figures come with lost or invented money is
worthless, so every session of the engine ends with this check."""
from __future__ import annotations

import asyncio

BALANCES_OFF = """
SELECT count(*) FROM accounts a
LEFT JOIN (SELECT account_id, sum(CASE direction WHEN 'credit' THEN amount ELSE -amount END) AS net
           FROM entries GROUP BY account_id) e ON e.account_id = a.id
WHERE a.balance <> coalesce(e.net, 0)"""
INTERNAL_NET = """
SELECT coalesce(sum(CASE direction WHEN 'credit' THEN amount ELSE -amount END), 0)::bigint
FROM entries WHERE kind IN ('transfer', 'fork', 'merge')"""
COUNTS = {
    "accounts": "SELECT count(*) FROM accounts",
    "deposit_entries": "SELECT count(*) FROM entries WHERE kind = 'deposit'",
    "transfer_legs": "SELECT count(*) FROM entries WHERE kind = 'transfer'",
    "trade_entries": "SELECT count(*) FROM entries WHERE kind IN ('premium', 'loss', 'fee')",
    "forked_units": "SELECT count(*) FROM portfolios WHERE parent_id IS NOT NULL",
}


async def _query(url: str) -> dict:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        found = {name: await connection.fetchval(sql) for name, sql in COUNTS.items()}
        found["balances_off"] = await connection.fetchval(BALANCES_OFF)
        found["internal_net"] = await connection.fetchval(INTERNAL_NET)
        return found
    finally:
        await connection.close()


async def verify_ledger(url: str, minimum: dict[str, int]) -> dict:
    """`minimum`: at least how many rows of each `COUNTS` kind must exist (what was
    acknowledged, set-up included). Returns the findings with `ok` and `problems`."""
    found = await asyncio.wait_for(_query(url), 300)
    problems = []
    if found["balances_off"]:
        problems.append(f"{found['balances_off']} accounts whose balance is not the sum of their entries")
    if found["internal_net"]:
        problems.append(f"transfers, forks and merges do not net to zero: {found['internal_net']} cents")
    for name, count in minimum.items():
        if found[name] < count:
            problems.append(f"ACKNOWLEDGED BUT MISSING: {name} {found[name]:,} < {count:,} acknowledged")
    return {**found, "minimum": minimum, "ok": not problems, "problems": problems}
