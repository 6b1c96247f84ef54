"""The functional core (`engine/rules.py`): the status table, every refusal with its code,
effective dates, and a stateful hypothesis test of money conservation over random
operation sequences on several accounts."""
from __future__ import annotations

import itertools
from datetime import date, datetime, timedelta, timezone

import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine import limits
from engine.errors import Refused
from engine.model import (
    Account, BookTrade, ChangeStatus, Close, Deposit, LegPosted, Rename, Renamed, StatusChanged, TransferCredit,
    TransferDebit, UpdateAccount, Withdraw,
)
from engine.rules import (
    DEFAULT_RULES, STATUS_TRANSITIONS, TERMINAL_STATUSES, Rules, apply_leg, decide, deployable, mutate,
    mutate_all, open_account, transition,
)

NOW = datetime(2026, 3, 16, 14, 30, tzinfo=timezone.utc)
TODAY = NOW.date()
OPENED_ON = date(2026, 1, 5)
STATUSES = ("active", "frozen", "closed", "merged")
_ids = itertools.count(1)


def new_account(account_type: str = "revenue", *, balance: int = 0, status: str = "active",
                opened_on: date = OPENED_ON, latest_effective_date: date | None = None) -> Account:
    account = open_account(account_id=f"acc_{next(_ids)}", name="test", account_type=account_type, owner="ann",
                           now=NOW, opened_on=opened_on)
    return msgspec.structs.replace(account, balance=balance, status=status,
                                   latest_effective_date=latest_effective_date)


def run(account: Account, command, *, now: datetime = NOW, rules: Rules = DEFAULT_RULES) -> Account:
    """Decides and applies `command`, as the actors do."""
    events = decide(account, command, transaction_id=f"txn_{next(_ids)}", now=now, rules=rules)
    return mutate_all(account, events)


def refusal(account: Account, command, *, now: datetime = NOW, rules: Rules = DEFAULT_RULES) -> Refused:
    with pytest.raises(Refused) as caught:
        decide(account, command, transaction_id="txn_refused", now=now, rules=rules)
    return caught.value


# -- the status table ------------------------------------------------------------------

ALL_PAIRS = [(a, b) for a in STATUSES for b in STATUSES if a != b]


@pytest.mark.parametrize(("current", "target"), sorted(STATUS_TRANSITIONS))
def test_every_legal_status_change_is_recorded_as_one_event(current, target):
    account = new_account(status=current)
    events = decide(account, ChangeStatus(status=target), transaction_id="t", now=NOW)
    assert events == [StatusChanged(account_id=account.id, status=target, at=NOW)]
    changed = mutate_all(account, events)
    assert changed.status == target
    assert changed.version == account.version + 1


@pytest.mark.parametrize(("current", "target"), [p for p in ALL_PAIRS if p not in STATUS_TRANSITIONS])
def test_every_illegal_status_change_is_refused_as_account_not_active(current, target):
    account = new_account(status=current)
    error = refusal(account, ChangeStatus(status=target))
    assert error.code == "account_not_active"
    with pytest.raises(Refused):
        transition(account, target)


def test_the_status_table_makes_closed_and_merged_terminal_and_lets_frozen_accounts_thaw():
    assert {target for source, target in STATUS_TRANSITIONS if source in TERMINAL_STATUSES} == set()
    assert ("frozen", "active") in STATUS_TRANSITIONS
    assert ("active", "frozen") in STATUS_TRANSITIONS
    assert TERMINAL_STATUSES == {"closed", "merged"}


def test_asking_for_the_current_status_records_nothing():
    for status in STATUSES:
        assert decide(new_account(status=status), ChangeStatus(status=status), transaction_id="t", now=NOW) == []


def test_changing_status_to_closed_refuses_a_non_empty_account():
    """SPEC section 3: closing needs a zero balance. `Close` checks it, but a bare
    `ChangeStatus(status="closed")` (and an `UpdateAccount` carrying status "closed") goes
    through the status table alone and closes an account that still holds money."""
    account = new_account(balance=500)
    assert refusal(account, ChangeStatus(status="closed")).code == "account_not_empty"
    assert refusal(account, UpdateAccount(status="closed")).code == "account_not_empty"


def test_an_update_on_a_terminal_account_is_refused_even_when_it_only_renames():
    for status in TERMINAL_STATUSES:
        account = new_account(status=status)
        assert refusal(account, UpdateAccount(name="new name")).code == "account_not_active"
        assert refusal(account, Rename(name="new name")).code == "account_not_active"


def test_an_update_that_freezes_and_renames_records_both_events_in_order():
    account = new_account()
    events = decide(account, UpdateAccount(name="renamed", status="frozen"), transaction_id="t", now=NOW)
    assert events == [StatusChanged(account_id=account.id, status="frozen", at=NOW),
                      Renamed(account_id=account.id, name="renamed", at=NOW)]
    updated = mutate_all(account, events)
    assert (updated.status, updated.name, updated.version) == ("frozen", "renamed", 2)


def test_an_update_with_nothing_new_records_nothing():
    account = new_account()
    assert decide(account, UpdateAccount(name=account.name, status="active"), transaction_id="t", now=NOW) == []


def test_a_frozen_account_can_be_renamed():
    renamed = run(new_account(status="frozen"), Rename(name="still frozen"))
    assert (renamed.name, renamed.status) == ("still frozen", "frozen")


# -- money movements ---------------------------------------------------------------------

def test_a_deposit_credits_the_amount_and_bumps_the_version():
    account = new_account()
    events = decide(account, Deposit(amount=1_234, memo="seed"), transaction_id="txn_1", now=NOW)
    assert len(events) == 1 and isinstance(events[0], LegPosted)
    leg = events[0].leg
    assert (leg.id, leg.kind, leg.direction, leg.amount, leg.memo) == ("txn_1", "deposit", "credit", 1_234, "seed")
    assert (leg.effective_date, leg.created_at, leg.delta) == (TODAY, NOW, 1_234)
    after = mutate_all(account, events)
    assert (after.balance, after.version, after.latest_effective_date, after.updated_at) == (1_234, 1, TODAY, NOW)


def test_a_withdrawal_of_the_whole_balance_leaves_zero():
    assert run(new_account(balance=700), Withdraw(amount=700)).balance == 0


@pytest.mark.parametrize("command", [
    Withdraw(amount=701),
    BookTrade(kind="loss", amount=701),
    BookTrade(kind="fee", amount=701),
    TransferDebit(to_account="acc_other", amount=701),
])
def test_a_debit_larger_than_the_balance_is_refused_as_insufficient_funds(command):
    error = refusal(new_account(balance=700), command)
    assert error.code == "insufficient_funds"
    assert error.details["balance"] == 700 and error.details["amount"] == 701


@pytest.mark.parametrize("command", [
    Deposit(amount=1),
    Withdraw(amount=1),
    BookTrade(kind="premium", amount=1),
    BookTrade(kind="loss", amount=1),
    BookTrade(kind="fee", amount=1),
    TransferDebit(to_account="acc_other", amount=1),
    TransferCredit(from_account="acc_other", amount=1),
])
@pytest.mark.parametrize("status", ["frozen", "closed", "merged"])
def test_money_never_moves_on_an_account_that_is_not_active(command, status):
    assert refusal(new_account(balance=100, status=status), command).code == "account_not_active"


@pytest.mark.parametrize("command", [Withdraw(amount=1), TransferDebit(to_account="acc_other", amount=1)])
def test_a_compounding_account_refuses_withdrawals_and_transfers_out(command):
    error = refusal(new_account("compounding", balance=100), command)
    assert error.code == "withdrawal_not_allowed"
    assert error.details["type"] == "compounding"


@pytest.mark.parametrize("command", [
    Deposit(amount=10), TransferCredit(from_account="acc_other", amount=10), BookTrade(kind="premium", amount=10),
    BookTrade(kind="loss", amount=10), BookTrade(kind="fee", amount=10),
])
def test_a_compounding_account_still_takes_credits_and_trade_results(command):
    run(new_account("compounding", balance=100), command)


def test_configured_rules_can_allow_withdrawals_from_compounding_and_refuse_them_elsewhere():
    rules = Rules(withdrawals_allowed={"generation": False, "revenue": True, "compounding": True})
    assert run(new_account("compounding", balance=100), Withdraw(amount=40), rules=rules).balance == 60
    assert refusal(new_account("generation", balance=100), Withdraw(amount=1), rules=rules).code == \
        "withdrawal_not_allowed"


def test_a_frozen_compounding_account_reports_that_it_is_not_active_first():
    assert refusal(new_account("compounding", balance=100, status="frozen"), Withdraw(amount=1)).code == \
        "account_not_active"


def test_trades_credit_premiums_and_debit_losses_and_fees():
    account = new_account(balance=1_000)
    account = run(account, BookTrade(kind="premium", amount=300))
    account = run(account, BookTrade(kind="loss", amount=200))
    account = run(account, BookTrade(kind="fee", amount=50))
    assert account.balance == 1_050
    assert account.version == 3


def test_transfer_legs_name_each_other_as_counterparties():
    source, target = new_account(balance=500), new_account()
    debit = decide(source, TransferDebit(to_account=target.id, amount=200), transaction_id="d", now=NOW,
                   correlation_id="xfr_1")[0].leg
    credit = decide(target, TransferCredit(from_account=source.id, amount=200), transaction_id="c", now=NOW,
                    correlation_id="xfr_1")[0].leg
    assert (debit.direction, debit.counterparty_account_id, debit.kind) == ("debit", target.id, "transfer")
    assert (credit.direction, credit.counterparty_account_id, credit.kind) == ("credit", source.id, "transfer")
    assert debit.correlation_id == credit.correlation_id == "xfr_1"
    assert debit.delta + credit.delta == 0


def test_a_credit_past_the_balance_limit_is_refused():
    account = new_account(balance=limits.BALANCE_MAX_CENTS - 5)
    assert refusal(account, Deposit(amount=6)).code == "balance_limit_exceeded"
    assert refusal(account, TransferCredit(from_account="x", amount=6)).code == "balance_limit_exceeded"
    assert refusal(account, BookTrade(kind="premium", amount=6)).code == "balance_limit_exceeded"
    assert run(account, Deposit(amount=5)).balance == limits.BALANCE_MAX_CENTS


def test_applying_a_leg_that_would_overdraw_is_a_bug_and_asserts():
    account = new_account(balance=100)
    leg = decide(account, Withdraw(amount=100), transaction_id="t", now=NOW)[0].leg
    emptied = mutate(account, LegPosted(leg=leg))
    with pytest.raises(AssertionError):
        mutate(emptied, LegPosted(leg=leg))
    with pytest.raises(AssertionError):
        apply_leg(99, leg)


def test_a_leg_for_another_account_is_a_bug_and_asserts():
    leg = decide(new_account(), Deposit(amount=1), transaction_id="t", now=NOW)[0].leg
    with pytest.raises(AssertionError):
        mutate(new_account(), LegPosted(leg=leg))


# -- closing -------------------------------------------------------------------------------

def test_closing_an_account_with_money_is_refused_as_account_not_empty():
    error = refusal(new_account(balance=1), Close())
    assert error.code == "account_not_empty"
    assert error.details["balance"] == 1


@pytest.mark.parametrize("status", ["active", "frozen"])
def test_an_empty_account_can_be_closed_from_active_or_frozen(status):
    assert run(new_account(status=status), Close()).status == "closed"


@pytest.mark.parametrize("status", ["closed", "merged"])
def test_a_closed_or_merged_account_cannot_be_closed_again(status):
    assert refusal(new_account(status=status), Close()).code == "account_not_active"


# -- dates ---------------------------------------------------------------------------------

def test_opening_an_account_defaults_to_today_and_refuses_a_future_date():
    account = open_account(account_id="acc_x", name="x", account_type="generation", owner="o", now=NOW)
    assert (account.opened_on, account.balance, account.status, account.version) == (TODAY, 0, "active", 0)
    with pytest.raises(Refused) as caught:
        open_account(account_id="acc_y", name="y", account_type="generation", owner="o", now=NOW,
                     opened_on=TODAY + timedelta(days=1))
    assert caught.value.code == "validation_failed"
    assert caught.value.details["field"] == "opened_on"


def test_a_trade_without_an_effective_date_takes_today():
    leg = decide(new_account(balance=10), BookTrade(kind="fee", amount=1), transaction_id="t", now=NOW)[0].leg
    assert leg.effective_date == TODAY


def test_a_trade_may_be_booked_for_an_earlier_week_between_opening_and_today():
    week = date(2026, 2, 2)
    account = run(new_account(), BookTrade(kind="premium", amount=10, effective_date=week))
    assert account.latest_effective_date == week
    assert run(account, BookTrade(kind="premium", amount=10, effective_date=week)).latest_effective_date == week
    assert run(new_account(), BookTrade(kind="premium", amount=1, effective_date=OPENED_ON)).balance == 1
    assert run(new_account(), BookTrade(kind="premium", amount=1, effective_date=TODAY)).balance == 1


@pytest.mark.parametrize(("effective_date", "latest"), [
    (TODAY + timedelta(days=1), None),             # in the future
    (OPENED_ON - timedelta(days=1), None),         # before the account opened
    (date(2026, 2, 1), date(2026, 2, 2)),          # before the latest effective date
])
def test_an_effective_date_outside_the_allowed_window_is_a_validation_failure(effective_date, latest):
    account = new_account(balance=100, latest_effective_date=latest)
    error = refusal(account, BookTrade(kind="premium", amount=1, effective_date=effective_date))
    assert error.code == "validation_failed"
    assert error.details["field"] == "effective_date"


def test_entries_other_than_trades_take_the_day_they_are_made_and_advance_the_latest_date():
    later = NOW + timedelta(days=3)
    account = run(new_account(), Deposit(amount=10), now=later)
    assert account.latest_effective_date == later.date()
    assert refusal(account, BookTrade(kind="premium", amount=1, effective_date=TODAY), now=later).code == \
        "validation_failed"


def test_a_backdated_trade_never_moves_the_latest_effective_date_backwards():
    account = new_account(latest_effective_date=date(2026, 3, 1))
    account = run(account, BookTrade(kind="premium", amount=1, effective_date=date(2026, 3, 1)))
    assert account.latest_effective_date == date(2026, 3, 1)


# -- deployable ----------------------------------------------------------------------------

@pytest.mark.parametrize(("balance", "expected"), [(0, 0), (100, 95), (19, 18), (1_000_000, 950_000)])
def test_deployable_keeps_the_five_percent_cash_buffer_rounding_down(balance, expected):
    for account_type in ("generation", "revenue", "compounding"):
        assert deployable(new_account(account_type, balance=balance)) == expected


# -- decide is pure --------------------------------------------------------------------------

def test_deciding_never_changes_the_account_it_is_given():
    account = new_account(balance=100)
    snapshot = msgspec.structs.replace(account)
    decide(account, Deposit(amount=5), transaction_id="t", now=NOW)
    with pytest.raises(Refused):
        decide(account, Withdraw(amount=500), transaction_id="t", now=NOW)
    assert account == snapshot


# -- stateful: random operation sequences on several accounts ---------------------------------

ACCOUNT_COUNT = 4
amounts = st.one_of(st.integers(1, 5_000), st.integers(1, 10**6), st.sampled_from([limits.AMOUNT_MAX_CENTS]))
indexes = st.integers(0, ACCOUNT_COUNT - 1)


class Ledger(RuleBasedStateMachine):
    """Accounts driven only through `decide` and `mutate_all`, next to an independent
    model of what each rule should say. After every step: balances never negative, each
    balance equals the sum of its legs, and money is conserved."""

    @initialize(types=st.lists(st.sampled_from(["generation", "revenue", "compounding"]),
                               min_size=ACCOUNT_COUNT, max_size=ACCOUNT_COUNT),
                seeds=st.lists(st.integers(0, 10**6), min_size=ACCOUNT_COUNT, max_size=ACCOUNT_COUNT))
    def open_accounts(self, types, seeds):
        self.now = NOW
        self.accounts = [new_account(account_type) for account_type in types]
        self.legs: dict[str, list] = {account.id: [] for account in self.accounts}
        self.flows = {"deposit": 0, "premium": 0, "withdrawal": 0, "loss": 0, "fee": 0}
        self.events_applied = {account.id: 0 for account in self.accounts}
        for index, seed in enumerate(seeds):
            if seed:
                self.deposit(index, seed)

    # -- the independent model of refusals -------------------------------------------------
    @staticmethod
    def expected_debit_refusal(account: Account, amount: int, *, withdrawal: bool) -> str | None:
        if account.status != "active":
            return "account_not_active"
        if withdrawal and account.type == "compounding":
            return "withdrawal_not_allowed"
        if account.balance < amount:
            return "insufficient_funds"
        return None

    @staticmethod
    def expected_credit_refusal(account: Account, amount: int) -> str | None:
        if account.status != "active":
            return "account_not_active"
        if account.balance + amount > limits.BALANCE_MAX_CENTS:
            return "balance_limit_exceeded"
        return None

    def attempt(self, index: int, command, expected: str | None, **context):
        """Decides `command`; checks the refusal against the model; returns the events."""
        account = self.accounts[index]
        try:
            events = decide(account, command, transaction_id=f"txn_{next(_ids)}", now=self.now, **context)
        except Refused as error:
            event(f"{type(command).__name__} refused: {error.code}")
            assert error.code == expected, f"{command!r} on {account!r}: {error.code} != {expected}"
            return None
        assert expected is None, f"{command!r} on {account!r} was accepted, expected {expected}"
        event(f"{type(command).__name__} accepted")
        return events

    def commit(self, index: int, events) -> None:
        account = self.accounts[index]
        self.accounts[index] = mutate_all(account, events)
        self.events_applied[account.id] += len(events)
        for event in events:
            if isinstance(event, LegPosted):
                self.legs[account.id].append(event.leg)

    # -- rules -------------------------------------------------------------------------------
    @rule(index=indexes, amount=amounts)
    def deposit(self, index, amount):
        expected = self.expected_credit_refusal(self.accounts[index], amount)
        events = self.attempt(index, Deposit(amount=amount), expected)
        if events is not None:
            self.commit(index, events)
            self.flows["deposit"] += amount

    @rule(index=indexes, amount=amounts)
    def withdraw(self, index, amount):
        expected = self.expected_debit_refusal(self.accounts[index], amount, withdrawal=True)
        events = self.attempt(index, Withdraw(amount=amount), expected)
        if events is not None:
            self.commit(index, events)
            self.flows["withdrawal"] += amount

    @rule(index=indexes, kind=st.sampled_from(["premium", "loss", "fee"]), amount=amounts,
          days_back=st.one_of(st.none(), st.integers(-1, 90)))
    def book_trade(self, index, kind, amount, days_back):
        account = self.accounts[index]
        today = self.now.date()
        effective = None if days_back is None else today - timedelta(days=days_back)
        floor = max(account.opened_on, account.latest_effective_date or account.opened_on)
        if kind == "premium":
            expected = self.expected_credit_refusal(account, amount)
        else:
            expected = self.expected_debit_refusal(account, amount, withdrawal=False)
        if account.status == "active" and effective is not None and (effective > today or effective < floor):
            expected = "validation_failed"
        events = self.attempt(index, BookTrade(kind=kind, amount=amount, effective_date=effective), expected)
        if events is not None:
            assert events[0].leg.effective_date == (effective or today)
            self.commit(index, events)
            self.flows[kind] += amount

    @rule(source=indexes, destination=indexes, amount=amounts)
    def transfer(self, source, destination, amount):
        target = destination
        if source == target:
            return
        debit_expected = self.expected_debit_refusal(self.accounts[source], amount, withdrawal=True)
        correlation = f"xfr_{next(_ids)}"
        debit = self.attempt(source, TransferDebit(to_account=self.accounts[target].id, amount=amount),
                             debit_expected, correlation_id=correlation)
        if debit is None:
            return
        credit_expected = self.expected_credit_refusal(self.accounts[target], amount)
        credit = self.attempt(target, TransferCredit(from_account=self.accounts[source].id, amount=amount),
                              credit_expected, correlation_id=correlation)
        if credit is None:
            return  # the source's debit is dropped: both legs or none
        self.commit(source, debit)
        self.commit(target, credit)

    @rule(index=indexes, status=st.sampled_from(["active", "frozen"]))
    def change_status(self, index, status):
        account = self.accounts[index]
        if account.status == status:
            expected = None
        elif (account.status, status) in STATUS_TRANSITIONS:
            expected = None
        else:
            expected = "account_not_active"
        events = self.attempt(index, UpdateAccount(status=status), expected)
        if events is not None:
            self.commit(index, events)
            assert self.accounts[index].status == status

    @rule(index=indexes)
    def close(self, index):
        account = self.accounts[index]
        if account.status in TERMINAL_STATUSES:
            expected = "account_not_active"
        elif account.balance != 0:
            expected = "account_not_empty"
        else:
            expected = None
        events = self.attempt(index, Close(), expected)
        if events is not None:
            self.commit(index, events)
            assert self.accounts[index].status == "closed"

    @precondition(lambda self: any(a.balance > 0 and a.status == "active" and a.type != "compounding"
                                   for a in self.accounts))
    @rule(data=st.data())
    def empty_an_account(self, data):
        """Withdraws a whole balance, so that closing an account is reached often."""
        candidates = [i for i, a in enumerate(self.accounts)
                      if a.balance > 0 and a.status == "active" and a.type != "compounding"]
        index = data.draw(st.sampled_from(candidates))
        self.withdraw(index, self.accounts[index].balance)
        assert self.accounts[index].balance == 0

    @rule(days=st.integers(0, 10))
    def time_passes(self, days):
        self.now += timedelta(days=days)

    # -- invariants ----------------------------------------------------------------------------
    @invariant()
    def balances_are_never_negative(self):
        for account in self.accounts:
            assert 0 <= account.balance <= limits.BALANCE_MAX_CENTS

    @invariant()
    def each_balance_is_the_sum_of_its_legs(self):
        for account in self.accounts:
            assert account.balance == sum(leg.delta for leg in self.legs[account.id])

    @invariant()
    def money_is_conserved(self):
        flows = self.flows
        assert sum(a.balance for a in self.accounts) == (
            flows["deposit"] + flows["premium"] - flows["withdrawal"] - flows["loss"] - flows["fee"])

    @invariant()
    def the_version_counts_every_event(self):
        for account in self.accounts:
            assert account.version == self.events_applied[account.id]

    @invariant()
    def closed_accounts_hold_nothing(self):
        for account in self.accounts:
            if account.status == "closed":
                assert account.balance == 0

    @invariant()
    def the_latest_effective_date_is_the_latest_leg_date(self):
        for account in self.accounts:
            dates = [leg.effective_date for leg in self.legs[account.id]]
            assert account.latest_effective_date == (max(dates) if dates else None)


Ledger.TestCase.settings = settings(max_examples=75, stateful_step_count=40, deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])
test_random_operation_sequences_conserve_money_and_keep_every_balance_equal_to_its_legs = Ledger.TestCase
