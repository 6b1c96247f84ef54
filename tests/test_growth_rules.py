"""The growth rules of the functional core (`engine/growth.py`, the fork check inside
`engine.rules.decide`, reinvestment, `engine/projection.py`): opening a portfolio,
forks, merges, quarterly reinvestment, the weekly premium and the projection, and a
stateful hypothesis test over a whole portfolio tree driven through `decide` and the
projection's `Book`."""
from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.errors import Refused
from engine.growth import capital_split, merge_due, merge_in, merge_steps, open_portfolio, weekly_premium
from engine.model import (
    BookTrade, Deposit, Fork, LegPosted, MergeIn, MergeOut, PortfolioMerged, PortfolioOpened, Reinvest, Reinvested,
    StatusChanged, TransferCredit, TransferDebit, Withdraw,
)
from engine.projection import Book, project
from engine.rules import DEFAULT_RULES, Rules, decide, open_account, quarter_end, quarter_of

NOW = datetime(2026, 3, 16, 14, 30, tzinfo=timezone.utc)
OPENED_ON = date(2026, 1, 5)
FORK = DEFAULT_RULES.fork_threshold_cents
MERGE = DEFAULT_RULES.merge_threshold_cents


class Ids:
    """Deterministic ids, as the projection makes them."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)

    def __call__(self, prefix: str) -> str:
        return f"{prefix}_{next(self._counter):06d}"


# One counter for the module's example tests, so ids never collide between calls.
NEW_ID = Ids()


def opened_book(capital: int, *, rules: Rules = DEFAULT_RULES, new_id: Ids | None = None) -> tuple[Book, dict]:
    """A `Book` holding one freshly opened root portfolio; also its account ids by type."""
    new_id = new_id or NEW_ID
    book = Book()
    book.apply(open_portfolio(name="p", owner="ann", capital=capital, now=NOW, new_id=new_id,
                              opened_on=OPENED_ON, rules=rules))
    root = next(iter(book.portfolios.values()))
    ids = {"portfolio": root.id, "generation": root.generation_account_id, "revenue": root.revenue_account_id,
           "compounding": root.compounding_account_id}
    return book, ids


def run(book: Book, account_id: str, command, *, rules: Rules = DEFAULT_RULES, new_id: Ids | None = None,
        now: datetime = NOW, correlation_id: str | None = None) -> list:
    """Decides `command` on the book's account and applies the events to the book."""
    new_id = new_id or NEW_ID
    events = decide(book.accounts[account_id], command, transaction_id=new_id("txn"), now=now,
                    correlation_id=correlation_id, rules=rules, new_id=new_id)
    book.apply(events)
    return events


def refusal_code(book: Book, account_id: str, command, *, rules: Rules = DEFAULT_RULES,
                 now: datetime = NOW) -> str:
    with pytest.raises(Refused) as caught:
        decide(book.accounts[account_id], command, transaction_id="txn_refused", now=now, rules=rules,
               new_id=Ids())
    return caught.value.code


def units_of(book: Book) -> list:
    return [p for p in book.portfolios.values() if p.is_unit]


def run_merge(book: Book, unit, *, rules: Rules = DEFAULT_RULES, new_id: Ids | None = None,
              now: datetime = NOW) -> list:
    """A merge as the live engine and the projection run it: the steps in order, the
    root's Com-Acc last with the sum of what the unit's accounts gave."""
    new_id = new_id or NEW_ID
    root = book.portfolios[unit.root_id]
    events: list = []
    for account_id, command in merge_steps(unit, root.compounding_account_id):
        command = command or merge_in(unit, events)
        events += decide(book.accounts[account_id], command, transaction_id=new_id("txn"), now=now,
                         correlation_id="mrg_1", rules=rules, new_id=new_id)
    book.apply(events)
    return events


# -- opening a portfolio -----------------------------------------------------------------------

@pytest.mark.parametrize(("capital", "expected"), [
    (1_000_000, {"generation": 400_000, "revenue": 300_000, "compounding": 300_000}),
    (1_000_009, {"generation": 400_003, "revenue": 300_002, "compounding": 300_004}),
    (1, {"generation": 0, "revenue": 0, "compounding": 1}),
    (3, {"generation": 1, "revenue": 0, "compounding": 2}),
])
def test_capital_splits_forty_thirty_thirty_with_the_rounding_remainder_to_the_compounding_account(
        capital, expected):
    assert capital_split(capital) == expected


@given(capital=st.integers(1, 10**15))
def test_the_capital_split_never_loses_a_cent_and_rounds_the_first_two_shares_down(capital):
    split = capital_split(capital)
    assert sum(split.values()) == capital
    assert split["generation"] == capital * 4 // 10
    assert split["revenue"] == capital * 3 // 10
    assert 0 <= split["compounding"] - capital * 3 // 10 <= 2  # two shares rounded down: < 2 cents over


def test_opening_a_portfolio_funds_three_accounts_and_sets_the_gen_acc_baseline():
    book, ids = opened_book(1_000_009)
    root = book.portfolios[ids["portfolio"]]
    assert not root.is_unit and root.root_id == root.id and root.depth == 0
    assert [a.type for a in book.accounts.values()] == ["generation", "revenue", "compounding"]
    generation, revenue, compounding = (book.accounts[ids[t]] for t in ("generation", "revenue", "compounding"))
    assert (generation.balance, revenue.balance, compounding.balance) == (400_003, 300_002, 300_004)
    assert generation.baseline == 400_003
    assert revenue.baseline == compounding.baseline == 0
    for account in book.accounts.values():
        assert account.portfolio_id == root.id and account.root_portfolio_id == root.id
        assert account.opened_on == OPENED_ON and account.status == "active"
        assert account.trade_income_cents == 0, "opening capital is not trade income"


def test_an_account_whose_share_rounds_to_zero_gets_no_opening_leg():
    events = open_portfolio(name="p", owner="ann", capital=1, now=NOW, new_id=Ids())
    legs = [e.leg for e in events if isinstance(e, LegPosted)]
    assert [(leg.kind, leg.amount) for leg in legs] == [("deposit", 1)]
    assert isinstance(events[0], PortfolioOpened)


def test_a_portfolio_cannot_open_in_the_future():
    with pytest.raises(Refused) as caught:
        open_portfolio(name="p", owner="ann", capital=100, now=NOW, new_id=Ids(),
                       opened_on=NOW.date() + timedelta(days=1))
    assert caught.value.code == "validation_failed"


# -- forks -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command_of", [
    lambda amount: BookTrade(kind="premium", amount=amount),
    lambda amount: Deposit(amount=amount),
    lambda amount: TransferCredit(from_account="acc_elsewhere", amount=amount),
], ids=["premium", "deposit", "transfer_in"])
def test_a_credit_reaching_baseline_plus_threshold_forks_off_the_whole_surplus(command_of):
    book, ids = opened_book(1_000_000_00)
    generation_id = ids["generation"]
    baseline = book.accounts[generation_id].baseline
    surplus = FORK + 1  # odd, so the halves differ
    events = run(book, generation_id, command_of(surplus))

    generation = book.accounts[generation_id]
    assert generation.balance == baseline, "the whole surplus leaves the Gen-Acc"
    [unit] = units_of(book)
    assert (unit.parent_id, unit.root_id, unit.depth) == (ids["portfolio"], ids["portfolio"], 1)
    assert unit.revenue_account_id is None
    unit_generation = book.accounts[unit.generation_account_id]
    unit_compounding = book.accounts[unit.compounding_account_id]
    assert unit_generation.balance == surplus // 2 == unit_generation.baseline
    assert unit_compounding.balance == surplus - surplus // 2 and unit_compounding.baseline == 0
    assert unit_generation.owner == unit_compounding.owner == "ann"
    assert unit_generation.root_portfolio_id == ids["portfolio"] and unit_generation.portfolio_depth == 1
    # The fork's legs share one correlation id and carry the credit's effective date.
    fork_legs = [e.leg for e in events if isinstance(e, LegPosted) and e.leg.kind == "fork"]
    assert sorted((leg.account_id, leg.direction, leg.amount) for leg in fork_legs) == sorted([
        (generation_id, "debit", surplus), (unit_generation.id, "credit", surplus // 2),
        (unit_compounding.id, "credit", surplus - surplus // 2)])
    assert len({leg.correlation_id for leg in fork_legs}) == 1
    assert {leg.effective_date for leg in fork_legs} == {events[0].leg.effective_date}


def test_a_credit_one_cent_short_of_the_threshold_does_not_fork():
    book, ids = opened_book(1_000_000_00)
    events = run(book, ids["generation"], BookTrade(kind="premium", amount=FORK - 1))
    assert len(events) == 1 and not units_of(book)
    assert book.accounts[ids["generation"]].balance == 400_000_00 + FORK - 1


def test_the_surplus_counts_from_the_baseline_so_losses_must_be_made_up_first():
    book, ids = opened_book(1_000_000_00)
    generation_id = ids["generation"]
    run(book, generation_id, BookTrade(kind="loss", amount=10_000_00))
    run(book, generation_id, BookTrade(kind="premium", amount=FORK))
    assert not units_of(book), "balance is baseline + threshold - loss: no fork yet"
    run(book, generation_id, BookTrade(kind="premium", amount=10_000_00))
    [unit] = units_of(book)
    assert book.accounts[generation_id].balance == 400_000_00
    assert book.accounts[unit.generation_account_id].balance == FORK // 2


def test_one_credit_forks_once_and_the_single_unit_takes_the_whole_surplus():
    book, ids = opened_book(1_000_000_00)
    events = run(book, ids["generation"], BookTrade(kind="premium", amount=3 * FORK + 7))
    assert sum(isinstance(e, PortfolioOpened) for e in events) == 1
    [unit] = units_of(book)
    assert sum(book.accounts[i].balance for i in unit.account_ids) == 3 * FORK + 7
    assert book.accounts[ids["generation"]].balance == 400_000_00


def test_a_unit_gen_acc_forks_from_its_own_baseline_into_a_grandchild_unit():
    book, ids = opened_book(1_000_000_00)
    run(book, ids["generation"], BookTrade(kind="premium", amount=FORK))
    [unit] = units_of(book)
    run(book, unit.generation_account_id, BookTrade(kind="premium", amount=FORK))
    grandchild = [p for p in units_of(book) if p.parent_id == unit.id]
    assert len(grandchild) == 1 and grandchild[0].depth == 2 and grandchild[0].root_id == ids["portfolio"]
    assert book.accounts[unit.generation_account_id].balance == FORK // 2


def test_a_manual_fork_moves_the_amount_asked_for_up_to_the_surplus():
    book, ids = opened_book(1_000_000_00)
    generation_id = ids["generation"]
    run(book, generation_id, BookTrade(kind="premium", amount=30_000_00))  # below the threshold
    assert not units_of(book)
    assert refusal_code(book, generation_id, Fork(amount=30_000_01)) == "fork_not_allowed"
    run(book, generation_id, Fork(amount=10_001))
    [unit] = units_of(book)
    assert book.accounts[generation_id].balance == 400_000_00 + 30_000_00 - 10_001
    assert book.accounts[unit.generation_account_id].balance == 5_000
    assert book.accounts[unit.generation_account_id].baseline == 5_000
    assert book.accounts[unit.compounding_account_id].balance == 5_001
    # Without an amount, the rest of the surplus goes.
    run(book, generation_id, Fork())
    assert book.accounts[generation_id].balance == 400_000_00
    assert len(units_of(book)) == 2
    assert refusal_code(book, generation_id, Fork()) == "fork_not_allowed", "no surplus left"


def test_a_manual_fork_is_refused_for_accounts_that_do_not_fork():
    book, ids = opened_book(1_000_000_00)
    for account_type in ("revenue", "compounding"):
        assert refusal_code(book, ids[account_type], Fork(amount=1)) == "fork_not_allowed"
    standalone = msgspec.structs.replace(
        open_account(account_id="acc_alone", name="g", account_type="generation", owner="ann", now=NOW),
        balance=10 * FORK)
    with pytest.raises(Refused) as caught:
        decide(standalone, Fork(amount=1), transaction_id="txn_1", now=NOW, new_id=Ids())
    assert caught.value.code == "fork_not_allowed"


def test_standalone_and_non_generation_accounts_never_fork_however_much_they_receive():
    standalone = open_account(account_id="acc_alone", name="g", account_type="generation", owner="ann", now=NOW)
    events = decide(standalone, Deposit(amount=100 * FORK), transaction_id="txn_1", now=NOW, new_id=Ids())
    assert len(events) == 1
    book, ids = opened_book(1_000_000_00)
    for account_type in ("revenue", "compounding"):
        events = run(book, ids[account_type], BookTrade(kind="premium", amount=100 * FORK))
        assert len(events) == 1
    assert not units_of(book)


def test_a_unit_gen_acc_funded_by_a_fork_starts_exactly_at_its_baseline():
    """However large the surplus, the fork's own credit never leaves the new Gen-Acc with a
    surplus of its own (fork legs are not checked, and need not be)."""
    book, ids = opened_book(1_000_000_00)
    run(book, ids["generation"], BookTrade(kind="premium", amount=10 * FORK))
    [unit] = units_of(book)
    assert book.accounts[unit.generation_account_id].balance == book.accounts[unit.generation_account_id].baseline


def test_the_fork_tree_stops_at_its_depth_limit():
    rules = Rules(portfolio_depth_max=1, fork_threshold_cents=100)
    book, ids = opened_book(1_000_000, rules=rules)
    run(book, ids["generation"], BookTrade(kind="premium", amount=1_000), rules=rules)
    [unit] = units_of(book)
    events = run(book, unit.generation_account_id, BookTrade(kind="premium", amount=10_000), rules=rules)
    assert len(events) == 1 and len(units_of(book)) == 1
    assert refusal_code(book, unit.generation_account_id, Fork(amount=1), rules=rules) == "fork_not_allowed"


# -- merges ------------------------------------------------------------------------------------

def forked(capital: int = 1_000_000_00, surplus: int = FORK) -> tuple[Book, dict, object]:
    book, ids = opened_book(capital)
    run(book, ids["generation"], BookTrade(kind="premium", amount=surplus))
    [unit] = units_of(book)
    return book, ids, unit


def test_merge_is_due_only_for_an_active_unit_at_the_threshold():
    book, ids, unit = forked()
    root = book.portfolios[ids["portfolio"]]
    assert merge_due(unit, [MERGE - 1, 0]) is False
    assert merge_due(unit, [MERGE - 1, 1]) is True
    assert merge_due(root, [MERGE, MERGE, MERGE]) is False, "a root never merges"
    merged = msgspec.structs.replace(unit, status="merged")
    assert merge_due(merged, [MERGE, 0]) is False


def test_the_merge_steps_visit_the_unit_gen_acc_then_its_com_acc_then_the_root_com_acc():
    book, ids, unit = forked()
    steps = merge_steps(unit, ids["compounding"])
    assert steps == [(unit.generation_account_id, MergeOut(to_account=ids["compounding"])),
                     (unit.compounding_account_id, MergeOut(to_account=ids["compounding"])),
                     (ids["compounding"], None)]


def test_a_merge_empties_the_unit_into_the_root_com_acc_and_marks_its_accounts_merged():
    book, ids, unit = forked()
    run(book, unit.compounding_account_id, BookTrade(kind="premium", amount=MERGE - FORK))
    unit_total = sum(book.accounts[i].balance for i in unit.account_ids)
    assert unit_total == MERGE
    assert merge_due(unit, [book.accounts[i].balance for i in unit.account_ids])
    root_compounding_before = book.accounts[ids["compounding"]].balance
    total_before = book.total()

    events = run_merge(book, unit)

    assert book.accounts[ids["compounding"]].balance == root_compounding_before + unit_total
    for account_id in unit.account_ids:
        assert book.accounts[account_id].balance == 0
        assert book.accounts[account_id].status == "merged"
    assert book.portfolios[unit.id].status == "merged"
    assert book.total() == total_before, "a merge moves money, it never creates or destroys it"
    assert sum(isinstance(e, PortfolioMerged) for e in events) == 1
    legs = [e.leg for e in events if isinstance(e, LegPosted)]
    assert {leg.kind for leg in legs} == {"merge"}
    assert sum(leg.delta for leg in legs) == 0
    # The merged accounts refuse everything that moves money.
    for account_id in unit.account_ids:
        assert refusal_code(book, account_id, Deposit(amount=1)) == "account_not_active"
        assert refusal_code(book, account_id, MergeOut(to_account=ids["compounding"])) == "account_not_active"


def test_merge_in_sums_what_the_unit_gave_and_takes_the_latest_effective_date():
    book, ids, unit = forked()
    events = []
    for account_id, command in merge_steps(unit, ids["compounding"])[:2]:
        events += decide(book.accounts[account_id], command, transaction_id=f"txn_{account_id}", now=NOW,
                         rules=DEFAULT_RULES)
    incoming = merge_in(unit, events)
    assert incoming == MergeIn(portfolio_id=unit.id, amount=FORK, effective_date=NOW.date())


def test_a_merge_of_a_unit_with_an_empty_account_posts_no_zero_legs():
    book, ids = opened_book(1_000_000_00)
    run(book, ids["generation"], BookTrade(kind="premium", amount=1))
    run(book, ids["generation"], Fork(amount=1))  # the unit's Gen-Acc gets floor(1 / 2) = 0
    [unit] = units_of(book)
    assert book.accounts[unit.generation_account_id].balance == 0
    events = run_merge(book, unit)
    legs = [e.leg for e in events if isinstance(e, LegPosted)]
    assert all(leg.amount > 0 for leg in legs)
    assert [e.status for e in events if isinstance(e, StatusChanged)] == ["merged", "merged"]
    assert book.accounts[ids["compounding"]].balance == 300_000_00 + 1


def test_units_below_a_merged_unit_stay_where_they_are():
    book, ids, unit = forked()
    run(book, unit.generation_account_id, BookTrade(kind="premium", amount=FORK))
    [grandchild] = [p for p in units_of(book) if p.parent_id == unit.id]
    grandchild_balances = [book.accounts[i].balance for i in grandchild.account_ids]
    run_merge(book, unit)
    assert book.portfolios[grandchild.id].status == "active"
    assert book.portfolios[grandchild.id].parent_id == unit.id
    assert [book.accounts[i].balance for i in grandchild.account_ids] == grandchild_balances
    assert all(book.accounts[i].status == "active" for i in grandchild.account_ids)


# -- reinvestment --------------------------------------------------------------------------------

def test_reinvestment_splits_positive_net_trade_income_seventy_five_twenty_five_once_per_quarter():
    book, ids = opened_book(1_000_000_00)
    revenue_id = ids["revenue"]
    run(book, revenue_id, BookTrade(kind="premium", amount=10_000))
    run(book, revenue_id, BookTrade(kind="loss", amount=2_000))
    run(book, revenue_id, BookTrade(kind="fee", amount=999))
    run(book, revenue_id, Deposit(amount=50_000))  # a flow, not income
    balance = book.accounts[revenue_id].balance
    assert book.accounts[revenue_id].trade_income_cents == 7_001

    [reinvested] = run(book, revenue_id, Reinvest(quarter="2026-Q1"))
    assert isinstance(reinvested, Reinvested)
    assert (reinvested.net_income, reinvested.contracts, reinvested.leaps) == (7_001, 5_250, 1_751)
    account = book.accounts[revenue_id]
    assert (account.allocations.contracts, account.allocations.leaps) == (5_250, 1_751)
    assert account.balance == balance, "reinvestment moves no money"
    assert account.trade_income_cents == 0 and account.last_reinvested_quarter == "2026-Q1"

    assert refusal_code(book, revenue_id, Reinvest(quarter="2026-Q1")) == "already_reinvested"
    assert book.accounts[revenue_id] == account

    # The next quarter counts only the income since.
    later = datetime(2026, 4, 20, 12, 0, tzinfo=timezone.utc)
    run(book, revenue_id, BookTrade(kind="premium", amount=400), now=later)
    [second] = run(book, revenue_id, Reinvest(quarter="2026-Q2"), now=later)
    assert (second.contracts, second.leaps) == (300, 100)
    assert (book.accounts[revenue_id].allocations.contracts, book.accounts[revenue_id].allocations.leaps) == (
        5_550, 1_851)
    assert refusal_code(book, revenue_id, Reinvest(quarter="2026-Q1"), now=later) == "already_reinvested", \
        "quarters are reinvested in order"


def test_negative_net_income_reinvests_nothing_but_still_uses_up_the_quarter():
    book, ids = opened_book(1_000_000_00)
    compounding_id = ids["compounding"]
    run(book, compounding_id, BookTrade(kind="loss", amount=5_000))
    [reinvested] = run(book, compounding_id, Reinvest(quarter="2026-Q1"))
    assert (reinvested.net_income, reinvested.contracts, reinvested.leaps) == (-5_000, 0, 0)
    assert refusal_code(book, compounding_id, Reinvest(quarter="2026-Q1")) == "already_reinvested"


def test_generation_accounts_never_reinvest_and_quarters_must_have_begun():
    book, ids = opened_book(1_000_000_00)
    assert refusal_code(book, ids["generation"], Reinvest(quarter="2026-Q1")) == "reinvest_not_allowed"
    assert refusal_code(book, ids["revenue"], Reinvest(quarter="2026-Q2")) == "validation_failed"
    assert refusal_code(book, ids["revenue"], Reinvest(quarter="2025-Q4")) == "quarter_before_opening"


# -- the weekly premium --------------------------------------------------------------------------

@pytest.mark.parametrize(("balance", "buffer_bps", "rate_bps", "expected"), [
    (1_000_000, 500, 150, 14_250),       # exact: 1,000,000 * 0.95 * 0.015
    (10_001, 500, 150, 143),             # 142.51425 rounds up
    (10_000, 500, 150, 143),             # 142.5 exactly: half away from zero
    (9_999, 500, 150, 142),              # 142.48575 rounds down
    (1, 0, 5_000, 1),                    # 0.5 -> 1
    (1, 0, 4_999, 0),                    # 0.4999 -> 0
    (1, 0, -5_000, -1),                  # -0.5 -> -1 (a loss)
    (10_000, 500, -150, -143),
    (0, 500, 150, 0),
    (123_456, 500, 0, 0),
])
def test_the_weekly_premium_is_balance_less_buffer_times_rate_rounded_half_away_from_zero(
        balance, buffer_bps, rate_bps, expected):
    assert weekly_premium(balance, buffer_bps, rate_bps) == expected


def _reference_premium(balance: int, buffer_bps: int, rate_bps: int) -> int:
    exact = Fraction(balance) * (1 - Fraction(buffer_bps, 10_000)) * Fraction(rate_bps, 10_000)
    magnitude = abs(exact)
    rounded = int(magnitude + Fraction(1, 2))  # floor(x + 1/2) on a non-negative value
    return rounded if exact >= 0 else -rounded


@given(balance=st.integers(0, 10**17), buffer_bps=st.integers(0, 10_000), rate_bps=st.integers(-10_000, 10_000))
def test_the_weekly_premium_matches_exact_rational_arithmetic(balance, buffer_bps, rate_bps):
    assert weekly_premium(balance, buffer_bps, rate_bps) == _reference_premium(balance, buffer_bps, rate_bps)


# -- the projection ------------------------------------------------------------------------------

NO_BUFFER = {"generation": 0, "revenue": 0, "compounding": 0}


def test_a_small_projection_matches_figures_computed_by_hand():
    """$10,000 with no cash buffer, 1% a week on the Gen-Acc only, fork at $40, merge at
    $40.30 (cents below). Week 1: the root Gen-Acc earns 4,000 and forks unit 1 (2,000 /
    2,000). Week 2: it forks unit 2; unit 1's Gen-Acc earns 20 (unit 1 holds 4,020).
    Week 3: it forks unit 3; unit 1 earns 20 more, reaches 4,040 >= 4,030 and merges into
    the root Com-Acc; its Com-Acc, merged, earns nothing; unit 2 earns 20."""
    rules = Rules(fork_threshold_cents=4_000, merge_threshold_cents=4_030, cash_buffer_bps=NO_BUFFER)
    result = project(initial_capital=1_000_000, weeks=3, start=OPENED_ON, rules=rules,
                     weekly_return_bps={"generation": 100, "revenue": 0, "compounding": 0})
    weeks = [(w.week, w.income, w.forks, w.merges, w.active_units, w.total_value) for w in result.weeks]
    assert weeks == [(1, 4_000, 1, 0, 1, 1_004_000),
                     (2, 4_020, 1, 0, 2, 1_008_020),
                     (3, 4_040, 1, 1, 2, 1_012_060)]
    last = result.weeks[-1]
    assert last.generation == 400_000 + 2_020 + 2_000        # root, unit 2, unit 3
    assert last.revenue == 300_000
    assert last.compounding == 300_000 + 4_040 + 2_000 + 2_000  # root (with the merge), unit 2, unit 3
    assert (result.units_created, result.units_merged, result.final_total_value) == (3, 1, 1_012_060)
    [year] = result.years
    assert (year.year, year.income, year.forks, year.merges, year.active_units, year.total_value) == (
        1, 12_060, 3, 1, 2, 1_012_060)


def test_a_projection_with_zero_returns_stays_flat():
    result = project(initial_capital=300_000_00, weeks=104, start=OPENED_ON,
                     weekly_return_bps={"generation": 0, "revenue": 0, "compounding": 0})
    assert len(result.weeks) == 104 and len(result.years) == 2
    for week in result.weeks:
        assert (week.total_value, week.income, week.forks, week.merges, week.active_units) == (
            300_000_00, 0, 0, 0, 0)
        assert (week.generation, week.revenue, week.compounding) == (120_000_00, 90_000_00, 90_000_00)
    assert (result.units_created, result.units_merged, result.final_total_value) == (0, 0, 300_000_00)


@given(capital=st.integers(1, 10**9), weeks=st.integers(1, 40),
       rates=st.fixed_dictionaries({t: st.integers(-2_000, 2_000) for t in ("generation", "revenue", "compounding")}),
       fork_share=st.integers(1, 1_000), merge_share=st.integers(1, 10_000))
@settings(max_examples=60, deadline=None)
def test_every_projected_week_adds_exactly_its_income_and_never_goes_negative(
        capital, weeks, rates, fork_share, merge_share):
    # Thresholds relative to the capital (in tenths of a percent), so forks happen but the
    # tree cannot grow without bound within the test's time.
    rules = Rules(fork_threshold_cents=max(1, capital * fork_share // 1_000),
                  merge_threshold_cents=max(1, capital * merge_share // 1_000))
    result = project(initial_capital=capital, weeks=weeks, weekly_return_bps=rates, start=OPENED_ON, rules=rules)
    total, units = capital, 0
    for week in result.weeks:
        total += week.income
        units += week.forks - week.merges
        assert week.total_value == total == week.generation + week.revenue + week.compounding
        assert min(week.generation, week.revenue, week.compounding) >= 0
        assert week.active_units == units >= 0
    assert result.final_total_value == total
    assert sum(y.income for y in result.years) == total - capital
    assert sum(y.forks for y in result.years) == result.units_created


# -- the stateful test over a portfolio tree -----------------------------------------------------

STATEFUL_RULES = Rules(fork_threshold_cents=5_000, merge_threshold_cents=20_000)
amounts = st.one_of(st.integers(1, 3_000), st.integers(1, 30_000), st.integers(1, 200_000))
picks = st.integers(0, 10**6)


class PortfolioTree(RuleBasedStateMachine):
    """A root portfolio and the units it forks, driven only through `decide`, the merge
    functions and the projection's `Book`, as the live engine drives them: the fork check
    inside every credit to a Gen-Acc, then the merge check of the credited account's unit.
    After every step: money is conserved, no balance is negative, no fork is left pending,
    merged units hold nothing, and each account's balance is the sum of its legs."""

    @initialize(capital=st.integers(1, 60_000))
    def open(self, capital):
        self.rules = STATEFUL_RULES
        self.new_id = Ids()
        self.now = NOW
        self.book = Book()
        opening = open_portfolio(name="p", owner="ann", capital=capital, now=self.now, new_id=self.new_id,
                                 opened_on=OPENED_ON, rules=self.rules)
        self.book.apply(opening)
        self.flows = {"deposit": capital, "premium": 0, "withdrawal": 0, "loss": 0, "fee": 0}
        self.legs: dict[str, int] = {}
        self.expected_income: dict[str, int] = {}
        self._count_legs(self.book.accounts.values(), opening)

    # -- helpers -------------------------------------------------------------------------------
    def _count_legs(self, new_accounts, events) -> None:
        for account in new_accounts:
            self.legs.setdefault(account.id, 0)
            self.expected_income.setdefault(account.id, 0)
        for e in events:
            if isinstance(e, LegPosted):
                self.legs[e.leg.account_id] = self.legs.get(e.leg.account_id, 0) + e.leg.delta

    def _account(self, pick: int):
        ids = list(self.book.accounts)
        return self.book.accounts[ids[pick % len(ids)]]

    def _decide(self, account, command, correlation_id=None):
        try:
            return decide(account, command, transaction_id=self.new_id("txn"), now=self.now,
                          correlation_id=correlation_id, rules=self.rules, new_id=self.new_id)
        except Refused as refusal:
            event(f"{type(command).__name__}: {refusal.code}")
            return refusal

    def _apply(self, events) -> None:
        opened = [a for e in events if isinstance(e, PortfolioOpened) for a in e.accounts]
        self.book.apply(events)
        self._count_legs(opened, events)

    def _check_fork(self, before, credit: int, events) -> None:
        """A credit to a portfolio Gen-Acc: forks exactly when the surplus reaches the
        threshold, once, with the whole surplus."""
        surplus = before.balance + credit - before.baseline
        opened = [e for e in events if isinstance(e, PortfolioOpened)]
        forks_expected = (before.type == "generation" and surplus >= self.rules.fork_threshold_cents
                          and before.portfolio_depth < self.rules.portfolio_depth_max)
        assert len(opened) == (1 if forks_expected else 0)
        if opened:
            event("fork after a credit")
            self._check_unit_holds(before.id, opened[0].portfolio, surplus)

    def _check_unit_holds(self, generation_id: str, unit, amount: int) -> None:
        generation = self.book.accounts[generation_id]
        unit_generation = self.book.accounts[unit.generation_account_id]
        unit_compounding = self.book.accounts[unit.compounding_account_id]
        assert unit_generation.balance + unit_compounding.balance == amount
        assert unit_generation.balance == amount // 2 == unit_generation.baseline
        assert unit.parent_id == generation.portfolio_id
        assert unit.depth == generation.portfolio_depth + 1

    def _merge(self, unit) -> None:
        """Runs the merge steps and checks that the unit ends empty in the root Com-Acc."""
        root = self.book.portfolios[unit.root_id]
        unit_total = sum(self.book.accounts[i].balance for i in unit.account_ids)
        root_before = self.book.accounts[root.compounding_account_id].balance
        others_before = {i: a.balance for i, a in self.book.accounts.items()
                         if i not in unit.account_ids and i != root.compounding_account_id}
        correlation_id = self.new_id("mrg")
        events: list = []
        for account_id, command in merge_steps(unit, root.compounding_account_id):
            command = command or merge_in(unit, events)
            outcome = self._decide(self.book.accounts[account_id], command, correlation_id)
            assert not isinstance(outcome, Refused), f"merge step refused: {outcome.code}"
            events += outcome
        self._apply(events)
        event("merge")
        assert self.book.portfolios[unit.id].status == "merged"
        assert self.book.accounts[root.compounding_account_id].balance == root_before + unit_total
        for account_id in unit.account_ids:
            assert self.book.accounts[account_id].balance == 0
            assert self.book.accounts[account_id].status == "merged"
        assert {i: self.book.accounts[i].balance for i in others_before} == others_before

    def _merge_if_due(self, account) -> None:
        """The live engine's merge check after a credit to an account of a unit."""
        portfolio = self.book.portfolios[account.portfolio_id]
        balances = [self.book.accounts[i].balance for i in portfolio.account_ids]
        if merge_due(portfolio, balances, self.rules):
            self._merge(portfolio)

    def _credit(self, account, command, amount: int, flow: str | None) -> None:
        outcome = self._decide(account, command)
        if account.status != "active":
            assert isinstance(outcome, Refused) and outcome.code == "account_not_active"
            return
        assert not isinstance(outcome, Refused), f"{command!r} refused: {outcome.code}"
        self._apply(outcome)
        if flow is not None:
            self.flows[flow] += amount
        if flow == "premium":
            self.expected_income[account.id] += amount
        self._check_fork(account, amount, outcome)
        self._merge_if_due(self.book.accounts[account.id])

    def _debit(self, account, command, amount: int, flow: str, *, withdrawal: bool) -> None:
        outcome = self._decide(account, command)
        if account.status != "active":
            expected = "account_not_active"
        elif withdrawal and account.type == "compounding":
            expected = "withdrawal_not_allowed"
        elif account.balance < amount:
            expected = "insufficient_funds"
        else:
            expected = None
        if expected is not None:
            assert isinstance(outcome, Refused) and outcome.code == expected, (outcome, expected)
            return
        assert not isinstance(outcome, Refused), f"{command!r} refused: {outcome.code}"
        assert len(outcome) == 1, "a debit never forks"
        self._apply(outcome)
        self.flows[flow] += amount
        if flow in ("loss", "fee"):
            self.expected_income[account.id] -= amount

    # -- rules ---------------------------------------------------------------------------------
    @rule(pick=picks, amount=amounts)
    def deposit(self, pick, amount):
        self._credit(self._account(pick), Deposit(amount=amount), amount, "deposit")

    @rule(pick=picks, amount=amounts)
    def premium(self, pick, amount):
        self._credit(self._account(pick), BookTrade(kind="premium", amount=amount), amount, "premium")

    @rule(pick=picks, amount=amounts, kind=st.sampled_from(["loss", "fee"]))
    def loss_or_fee(self, pick, amount, kind):
        self._debit(self._account(pick), BookTrade(kind=kind, amount=amount), amount, kind, withdrawal=False)

    @rule(pick=picks, amount=amounts)
    def withdraw(self, pick, amount):
        self._debit(self._account(pick), Withdraw(amount=amount), amount, "withdrawal", withdrawal=True)

    @rule(source_pick=picks, target_pick=picks, amount=amounts)
    def transfer(self, source_pick, target_pick, amount):
        source, target = self._account(source_pick), self._account(target_pick)
        if source.id == target.id:
            return
        correlation_id = self.new_id("xfr")
        debit = self._decide(source, TransferDebit(to_account=target.id, amount=amount), correlation_id)
        if isinstance(debit, Refused):
            assert debit.code in ("account_not_active", "withdrawal_not_allowed", "insufficient_funds")
            assert source.status != "active" or source.type == "compounding" or source.balance < amount
            return
        credit = self._decide(target, TransferCredit(from_account=source.id, amount=amount), correlation_id)
        if isinstance(credit, Refused):
            assert credit.code == "account_not_active" and target.status != "active"
            return  # both legs or none: the debit is dropped
        self._apply(debit + credit)
        event("transfer")
        self._check_fork(target, amount, credit)
        self._merge_if_due(self.book.accounts[target.id])

    @rule(pick=picks, amount=st.one_of(st.none(), amounts))
    def manual_fork(self, pick, amount):
        account = self._account(pick)
        outcome = self._decide(account, Fork(amount=amount))
        surplus = account.balance - account.baseline
        allowed = (account.type == "generation" and account.status == "active" and surplus > 0
                   and (amount is None or amount <= surplus))
        if not allowed:
            assert isinstance(outcome, Refused)
            assert outcome.code in ("fork_not_allowed", "account_not_active")
            return
        assert not isinstance(outcome, Refused), outcome.code
        wanted = surplus if amount is None else amount
        self._apply(outcome)
        event("manual fork")
        assert self.book.accounts[account.id].balance == account.balance - wanted
        [opened] = [e for e in outcome if isinstance(e, PortfolioOpened)]
        self._check_unit_holds(account.id, opened.portfolio, wanted)

    @precondition(lambda self: any(p.is_unit and p.status == "active" for p in self.book.portfolios.values()))
    @rule(pick=picks)
    def forced_merge(self, pick):
        units = [p for p in self.book.portfolios.values() if p.is_unit and p.status == "active"]
        self._merge(units[pick % len(units)])

    @rule(pick=picks, quarter_back=st.integers(0, 3))
    def reinvest_twice(self, pick, quarter_back):
        account = self._account(pick)
        days = range(0, (self.now.date() - OPENED_ON).days + 1, 7)
        quarters = sorted({quarter_of(OPENED_ON + timedelta(days=d)) for d in days} | {quarter_of(self.now.date())})
        quarter = quarters[max(0, len(quarters) - 1 - quarter_back)]
        outcome = self._decide(account, Reinvest(quarter=quarter))
        if account.type == "generation":
            assert isinstance(outcome, Refused) and outcome.code == "reinvest_not_allowed"
            return
        if account.status == "merged":
            assert isinstance(outcome, Refused) and outcome.code == "account_not_active"
            return
        if quarter_end(quarter) < account.opened_on:
            assert isinstance(outcome, Refused) and outcome.code == "quarter_before_opening"
            return
        if account.last_reinvested_quarter is not None and quarter <= account.last_reinvested_quarter:
            assert isinstance(outcome, Refused) and outcome.code == "already_reinvested"
            return
        assert not isinstance(outcome, Refused), outcome.code
        [reinvested] = outcome
        net = self.expected_income[account.id]
        assert reinvested.net_income == net
        assert reinvested.contracts == max(0, net) * 3 // 4 and reinvested.leaps == max(0, net) - reinvested.contracts
        balance = account.balance
        self._apply(outcome)
        self.expected_income[account.id] = 0
        event("reinvested")
        after = self.book.accounts[account.id]
        assert after.balance == balance
        again = self._decide(after, Reinvest(quarter=quarter))
        assert isinstance(again, Refused) and again.code == "already_reinvested"
        assert self.book.accounts[account.id] == after, "reinvesting a quarter twice changes nothing"

    @rule(rates=st.fixed_dictionaries({t: st.integers(0, 1_500) for t in ("generation", "revenue", "compounding")}))
    def a_week_of_premiums(self, rates):
        """One projected week, live-style: every account active at the week's start earns
        its weekly premium in creation order, with the growth rules after each credit."""
        self.now += timedelta(days=7)
        for account_id in [a.id for a in self.book.accounts.values() if a.status == "active"]:
            account = self.book.accounts[account_id]
            if account.status != "active":
                continue
            premium = weekly_premium(account.balance, self.rules.cash_buffer_bps[account.type], rates[account.type])
            if premium > 0:
                self._credit(account, BookTrade(kind="premium", amount=premium), premium, "premium")

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def money_is_conserved(self):
        flows = self.flows
        assert self.book.total() == (flows["deposit"] + flows["premium"] - flows["withdrawal"] - flows["loss"]
                                     - flows["fee"])

    @invariant()
    def every_balance_is_non_negative_and_the_sum_of_its_legs(self):
        for account in self.book.accounts.values():
            assert account.balance >= 0
            assert account.balance == self.legs[account.id]

    @invariant()
    def no_fork_is_left_pending(self):
        for account in self.book.accounts.values():
            if account.type == "generation" and account.status == "active":
                assert account.balance - account.baseline < self.rules.fork_threshold_cents

    @invariant()
    def merged_units_hold_nothing_and_the_tree_is_consistent(self):
        for portfolio in self.book.portfolios.values():
            accounts = [self.book.accounts[i] for i in portfolio.account_ids]
            assert all(a.portfolio_id == portfolio.id for a in accounts)
            if portfolio.status == "merged":
                assert all(a.status == "merged" and a.balance == 0 for a in accounts)
            else:
                assert all(a.status == "active" for a in accounts)
            if portfolio.is_unit:
                parent = self.book.portfolios[portfolio.parent_id]
                assert portfolio.depth == parent.depth + 1 and portfolio.root_id == parent.root_id
        assert self.book.forks == sum(p.is_unit for p in self.book.portfolios.values())
        assert self.book.merges == sum(p.status == "merged" for p in self.book.portfolios.values())

    @invariant()
    def trade_income_is_what_the_model_expects(self):
        for account in self.book.accounts.values():
            assert account.trade_income_cents == self.expected_income[account.id]


PortfolioTree.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
test_random_growth_sequences_conserve_money_and_keep_every_fork_and_merge_exact = PortfolioTree.TestCase
