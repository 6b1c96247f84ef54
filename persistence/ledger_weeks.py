"""Each account's ledger summed per ISO week, kept in memory and brought up to date with
only the entries committed since the last read.

Analytics (and the drawdown check after every loss or fee) need an account's weekly
sums. Summing 10,000 entries in PostgreSQL costs 5-15 ms per request on this machine
class; folding in the few entries committed since the last request costs one index probe
per account (a fraction of a millisecond). That is safe because of two facts about the
ledger, which the writer guarantees and this module relies on:

- entries are append-only: a committed entry never changes and is never deleted;
- an account's entries become visible in `sequence` order: each batch updates the
  account's row guarded by the version it was decided on (an entry's `sequence` is the
  version its leg left the account at),
  so a batch with sequence n + 1 cannot commit before the one with n. Any snapshot
  therefore holds a prefix of each account's entries, and "the entries after the last
  sequence folded in" is exactly what is missing.

The engine's writer also hands over every batch it commits (`committed`), so an account
read once stays current without another query: the drawdown check after every loss or
fee and an operator's analytics read it from memory (decision 91). A commit is folded in
only where it continues what is kept: an account's sums are complete up to its version
(`AccountWeeks.sequence`: an entry is numbered by the version its leg left, and a read
takes the account's version from the same snapshot as its entries), and a batch names
the version each account had before it. The account is *current* when nothing
committed after that version (`AccountWeeks.committed`: the newest version known to have
committed, from reads and batches, including those that committed while a query of the
account was in flight). A failed operation's accounts are forgotten (`forget`), and
everything is when the writer's connection drops (a statement's outcome unknown) or a new
one is made (`clear`): those accounts are read again.

Every sum here is mergeable (sums add, the first inflow's weekday is a minimum), so a
back-dated entry (an effective date in an old week) just changes that week; the running
balances are recomputed from the sums. The memory is bounded (`WEEKS_CACHED_MAX` weeks
over all accounts, least recently used accounts go first)."""
from __future__ import annotations

import asyncio
import collections
from datetime import date, timedelta

from engine.analytics import DAYS_PER_WEEK, TRADE_COLUMNS, WeekTotals
from engine.model import Account, Transaction

# About 300 bytes a week (its sums and its WeekTotals): ~30 MiB at the bound.
WEEKS_CACHED_MAX = 100_000
# Concurrent refreshes of the same account can each find the other one's work folded in
# first; each round re-reads only what is still missing. After this many rounds the
# remaining accounts are summed afresh without the cache (always correct).
REFRESH_ROUNDS_MAX = 4
NOTHING_FOLDED = -1   # entries' sequences start at 0 or 1: "after -1" is every entry

# Weekly sums of each account's entries with a sequence after the one already folded in
# ($1 the accounts, $2 that sequence of each, -1 for none). The sequences travel as text:
# a bigint[] parameter costs asyncpg a type-introspection query on every new connection
# (8-14 ms), and unnest of a text[] lets the planner count the accounts. The weekday (Monday = 0) and the week's Monday come
# from integer date arithmetic (1970-01-05 was a Monday), not date_trunc, which goes
# through a timestamp in the session's time zone. The flow columns are Modified Dietz's:
# the net external flow, each flow times the days from the start of its day to the
# week's end, and the weekday of the first inflow. Money forked and merged out of the
# account (debits of those kinds) rides along, for the portfolio's growth figures. No
# ORDER BY: the rows are folded into a dictionary, and sorting ~10,000 input rows by a
# text column took a third of the query's time.
# Each account also gives its version in the same snapshot (NULL when it does not exist),
# on a row of NULL sums when nothing was committed after `sequence_after`.
SELECT_WEEKS_AFTER = """
SELECT known.account_id, (SELECT a.version FROM accounts a WHERE a.id = known.account_id) AS account_version,
       weeks.*
FROM unnest($1::text[], $2::text[]) AS known(account_id, sequence_after)
     LEFT JOIN LATERAL (
         SELECT e.effective_date - derived.weekday AS week,
                coalesce(sum(e.amount) FILTER (WHERE e.kind = 'premium'), 0)::bigint AS premium,
                coalesce(sum(e.amount) FILTER (WHERE e.kind = 'loss'), 0)::bigint AS loss,
                coalesce(sum(e.amount) FILTER (WHERE e.kind = 'fee'), 0)::bigint AS fee,
                coalesce(sum(derived.signed) FILTER (WHERE derived.flow), 0)::bigint AS flow,
                coalesce(sum(derived.signed * (7 - derived.weekday)) FILTER (WHERE derived.flow), 0)::bigint
                    AS flow_cent_days,
                min(derived.weekday) FILTER (WHERE derived.flow AND derived.signed > 0) AS first_inflow_weekday,
                coalesce(sum(e.amount) FILTER (WHERE e.kind = 'fork' AND e.direction = 'debit'), 0)::bigint
                    AS forked,
                coalesce(sum(e.amount) FILTER (WHERE e.kind = 'merge' AND e.direction = 'debit'), 0)::bigint
                    AS merged
         FROM entries e,
              LATERAL (SELECT ((e.effective_date - DATE '1970-01-05') % 7 + 7) % 7 AS weekday,
                              CASE WHEN e.direction = 'credit' THEN e.amount ELSE -e.amount END AS signed,
                              e.kind NOT IN ('premium', 'loss', 'fee') AS flow) AS derived
         WHERE e.account_id = known.account_id AND e.sequence > known.sequence_after::bigint
         GROUP BY week) AS weeks ON true"""

# Positions in a week's sums.
PREMIUM, LOSS, FEE, FLOW, FLOW_CENT_DAYS, FIRST_INFLOW_WEEKDAY = range(6)
TRADE_KINDS = frozenset(TRADE_COLUMNS)   # premium, loss, fee: not flows


class AccountWeeks:
    """One account's weekly sums of every entry up to (and including) entry `sequence`:
    the account's version when they were read or last brought up to date. `committed` is
    the newest version of the account known to have committed."""

    __slots__ = ("sequence", "committed", "weeks", "forked", "merged", "_totals")

    def __init__(self) -> None:
        self.sequence = self.committed = NOTHING_FOLDED
        self.weeks: dict[date, list] = {}
        self.forked = self.merged = 0
        self._totals: list[WeekTotals] | None = []

    @property
    def current(self) -> bool:
        """Nothing is known to have committed after what is folded in."""
        return self.sequence == self.committed

    def fold(self, row) -> None:
        """Adds one row of SELECT_WEEKS_AFTER (one week's entries after `sequence`)."""
        self._add(row["week"], row["premium"], row["loss"], row["fee"], row["flow"], row["flow_cent_days"],
                  row["first_inflow_weekday"], row["forked"], row["merged"])

    def fold_entry(self, entry: Transaction) -> None:
        """Adds one committed entry, as SELECT_WEEKS_AFTER sums it."""
        kind, amount, day = entry.kind, entry.amount, entry.effective_date
        weekday = day.weekday()
        week = day - timedelta(days=weekday)
        if kind in TRADE_KINDS:
            self._add(week, amount if kind == "premium" else 0, amount if kind == "loss" else 0,
                      amount if kind == "fee" else 0, 0, 0, None, 0, 0)
            return
        credit = entry.direction == "credit"
        signed = amount if credit else -amount
        debit = 0 if credit else amount
        self._add(week, 0, 0, 0, signed, signed * (DAYS_PER_WEEK - weekday), weekday if credit else None,
                  debit if kind == "fork" else 0, debit if kind == "merge" else 0)

    def _add(self, week: date, premium: int, loss: int, fee: int, flow: int, cent_days: int,
             first_inflow: int | None, forked: int, merged: int) -> None:
        sums = self.weeks.get(week)
        if sums is None:
            self.weeks[week] = [premium, loss, fee, flow, cent_days, first_inflow]
        else:
            sums[PREMIUM] += premium
            sums[LOSS] += loss
            sums[FEE] += fee
            sums[FLOW] += flow
            sums[FLOW_CENT_DAYS] += cent_days
            if first_inflow is not None and (sums[FIRST_INFLOW_WEEKDAY] is None
                                             or first_inflow < sums[FIRST_INFLOW_WEEKDAY]):
                sums[FIRST_INFLOW_WEEKDAY] = first_inflow
        self.forked += forked
        self.merged += merged
        self._totals = None

    def totals(self, account_id: str) -> list[WeekTotals]:
        """The weeks in order, each with its end balance: an account starts at zero and
        its balance is the sum of its entries."""
        if self._totals is None:
            balance, totals = 0, []
            for week in sorted(self.weeks):
                premium, loss, fee, flow, cent_days, first_inflow = self.weeks[week]
                balance += flow + premium - loss - fee
                assert balance >= 0, (account_id, week, balance)
                totals.append(WeekTotals(week, premium, loss, fee, balance, flow, cent_days, first_inflow))
            self._totals = totals
        return self._totals


class LedgerWeeks:
    """The weekly sums of the accounts read recently: brought up to date by each read,
    and by every batch the writer commits while it is `fed`. The sums handed out are the
    kept objects themselves, which later batches go on changing: read them at once."""

    def __init__(self, weeks_cached_max: int = WEEKS_CACHED_MAX):
        assert weeks_cached_max >= 1
        self.weeks_cached_max = weeks_cached_max
        self._accounts: collections.OrderedDict[str, AccountWeeks] = collections.OrderedDict()
        self._weeks_cached = 0
        self._joinable: dict[tuple[str, ...], asyncio.Future] = {}
        # True while a writer hands over every batch it commits (`committed`): only then
        # is a current account answered without a query.
        self.fed = False
        # Accounts with a query in flight (how many), the newest version of each
        # committed meanwhile, and those forgotten meanwhile (read again from nothing).
        self._reading: collections.Counter[str] = collections.Counter()
        self._late: dict[str, int] = {}
        self._doubtful: set[str] = set()

    async def read(self, pool, account_ids: list[str]) -> dict[str, AccountWeeks]:
        """Every account's sums, each as of a moment after this call began (an account
        with no entries has none; the moment is per account, not one for all). `pool` is
        an asyncpg pool or connection. Accounts kept and current (while `fed`) are
        answered from memory; the others with one query.

        A portfolio's analytics ask for its weekly sums and its growth at once: a read of
        the same accounts that begins while another has not yet sent its query shares
        that query. The query's snapshot is taken after both began, so each still sees
        everything committed before it was called."""
        if self.fed:
            accounts = self._accounts
            known = {}
            for account_id in account_ids:
                kept = accounts.get(account_id)
                if kept is not None and kept.sequence == kept.committed:
                    known[account_id] = kept
                    accounts.move_to_end(account_id)
            if known:
                rest = [i for i in account_ids if i not in known]
                return {**known, **await self.read(pool, rest)} if rest else known
        key = tuple(account_ids)
        shared = self._joinable.get(key)
        if shared is not None:
            try:
                return await asyncio.shield(shared)
            except asyncio.CancelledError:
                if not shared.cancelled():
                    raise  # this read itself was cancelled
                # The read it joined was cancelled: read on its own.
        future = asyncio.get_running_loop().create_future()
        self._joinable[key] = future
        try:
            try:
                await asyncio.sleep(0)  # the window in which reads that begin now join this one
            finally:
                if self._joinable.get(key) is future:
                    del self._joinable[key]
            found = await self._read(pool, account_ids)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as error:
            future.set_exception(error)
            future.exception()  # retrieved here: without a joiner nobody else would
            raise
        future.set_result(found)
        return found

    async def _read(self, pool, account_ids: list[str]) -> dict[str, AccountWeeks]:
        found: dict[str, AccountWeeks] = {}
        pending = list(dict.fromkeys(account_ids))
        reading = self._reading
        for round_number in range(REFRESH_ROUNDS_MAX + 1):
            if not pending:
                break
            cached = round_number < REFRESH_ROUNDS_MAX
            known = [self._accounts.get(i) if cached else None for i in pending]
            after = [k.sequence if k is not None else NOTHING_FOLDED for k in known]
            reading.update(pending)
            try:
                rows = await pool.fetch(SELECT_WEEKS_AFTER, pending, [str(n) for n in after])
            finally:
                late, doubtful = {}, set()
                for account_id in pending:
                    if account_id in self._late:
                        late[account_id] = self._late[account_id]
                    if account_id in self._doubtful:
                        doubtful.add(account_id)
                    if reading[account_id] > 1:
                        reading[account_id] -= 1
                    else:
                        del reading[account_id]
                        self._late.pop(account_id, None)
                        self._doubtful.discard(account_id)
            by_account: dict[str, list] = {}
            for row in rows:
                by_account.setdefault(row["account_id"], []).append(row)
            retry = []
            for account_id, sequence_after in zip(pending, after):
                if cached and account_id in doubtful and sequence_after != NOTHING_FOLDED:
                    # Forgotten while the query was in flight: its rows start after the
                    # version it had, which is gone. Read again from nothing.
                    retry.append(account_id)
                    continue
                if not cached or account_id in doubtful:
                    # Read from nothing: afresh, or forgotten while the query was in
                    # flight (a batch of unknown outcome): answered, not kept.
                    found[account_id] = self._folded(AccountWeeks(), by_account.get(account_id, ()), NOTHING_FOLDED)
                    continue
                current = self._accounts.get(account_id)
                if (current.sequence if current is not None else NOTHING_FOLDED) != sequence_after:
                    # Another read or a batch folded entries in (or the account was
                    # dropped) while this one waited: what it read may overlap. Read
                    # again from there.
                    retry.append(account_id)
                    continue
                if current is None:
                    current = self._accounts[account_id] = AccountWeeks()
                weeks_before = len(current.weeks)
                found[account_id] = self._folded(current, by_account.get(account_id, ()),
                                                 late.get(account_id, NOTHING_FOLDED))
                self._weeks_cached += len(current.weeks) - weeks_before
                self._accounts.move_to_end(account_id)
            pending = retry
        self._bound()
        return found

    @staticmethod
    def _folded(account: AccountWeeks, rows, late: int) -> AccountWeeks:
        """Folds a query's rows in: the account is then complete up to its version in the
        query's snapshot; `late` is the newest version committed while it was in flight."""
        for row in rows:
            if row["week"] is not None:
                account.fold(row)
            version = row["account_version"]
            if version is not None and version > account.sequence:
                account.sequence = version
        account.committed = max(account.committed, account.sequence, late)
        return account

    def committed(self, before: dict[str, int], updates: dict[str, Account], inserts: dict[str, Account],
                  entries: list[Transaction]) -> None:
        """The writer's, for every batch it commits: `updates` the state each existing
        account was left in, `before[account]` its version before the batch, `inserts`
        the accounts the batch opened, `entries` its ledger entries. An account kept
        whose sums reach exactly `before` takes the batch's entries in; any other kept
        account only learns that a newer version committed (it is read again)."""
        accounts, reading = self._accounts, self._reading
        if not accounts and not reading:
            return
        if inserts:
            self.forget(inserts)   # an id read before it existed: read it again
        folding: dict[str, AccountWeeks] = {}
        for account_id, state in updates.items():
            # A query in flight learns of the version too, kept or not: what it keeps may
            # be another read's older snapshot if the bound drops this one meanwhile.
            if account_id in reading and self._late.get(account_id, NOTHING_FOLDED) < state.version:
                self._late[account_id] = state.version
            kept = accounts.get(account_id)
            if kept is None:
                continue
            if kept.sequence == before[account_id]:
                folding[account_id] = kept
                kept.sequence = state.version
            if state.version > kept.committed:
                kept.committed = state.version
        if folding:
            weeks_before = sum(len(kept.weeks) for kept in folding.values())
            for entry in entries:
                kept = folding.get(entry.account_id)
                if kept is not None:
                    kept.fold_entry(entry)
            self._weeks_cached += sum(len(kept.weeks) for kept in folding.values()) - weeks_before
            self._bound()

    def forget(self, account_ids) -> None:
        """These accounts are read again (a batch touching them has an unknown outcome,
        or opened them), also by a query in flight now."""
        for account_id in account_ids:
            kept = self._accounts.pop(account_id, None)
            if kept is not None:
                self._weeks_cached -= len(kept.weeks)
            if account_id in self._reading:
                self._doubtful.add(account_id)

    def clear(self, *, fed: bool) -> None:
        """Forgets every account (the writer's connection changed: another engine may
        have written meanwhile); `fed`: whether batches are handed over from now on."""
        self.forget(list(self._accounts))
        self._doubtful.update(self._reading)
        self.fed = fed

    def _bound(self) -> None:
        """Drops the least recently read accounts until the weeks kept fit the bound
        (the most recent one stays, whatever its size)."""
        while self._weeks_cached > self.weeks_cached_max and len(self._accounts) > 1:
            _, dropped = self._accounts.popitem(last=False)
            self._weeks_cached -= len(dropped.weeks)

    @property
    def weeks_cached(self) -> int:
        return self._weeks_cached

    def __len__(self) -> int:
        return len(self._accounts)
