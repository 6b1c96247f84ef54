"""Every account rule as a pure function: `decide(account, command, ...)` returns the
events to record or raises `Refused`; `mutate(account, event)` returns the new state.
The live actors, the persistence writer's safety check and the tests all call these."""
from __future__ import annotations

from datetime import date, datetime, timedelta

from typing import Callable

import msgspec
from msgspec import Struct
from msgspec.structs import replace

from engine import limits
from engine.errors import refuse
from engine.model import (
    Account, Allocations, BookTrade, ChangeStatus, Close, Command, Deposit, Event, Fork, Leg, LegPosted, MergeIn,
    MergeOut, Portfolio, PortfolioMerged, Reinvest, Reinvested, Rename, Renamed, StatusChanged, TransferCredit,
    TransferDebit, PortfolioOpened, UpdateAccount, Withdraw,
)


class Rules(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The configurable part of the rules (SPEC section 3 defaults); `[rules]` in the
    configuration overrides any of them."""

    withdrawals_allowed: dict[str, bool] = msgspec.field(
        default_factory=lambda: {"generation": True, "revenue": True, "compounding": False})
    cash_buffer_bps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"generation": 500, "revenue": 500, "compounding": 500})
    capital_share_bps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"generation": 4000, "revenue": 3000, "compounding": 3000})
    weekly_target_bps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"generation": 150, "revenue": 100, "compounding": 50})
    drawdown_limit_bps: dict[str, int] = msgspec.field(
        default_factory=lambda: {"generation": 1500, "revenue": 1000, "compounding": 700})
    fork_threshold_cents: int = 50_000_00
    merge_threshold_cents: int = 500_000_00
    reinvest_contracts_bps: int = 7500
    reinvested_types: tuple[str, ...] = ("revenue", "compounding")
    portfolio_depth_max: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.fork_threshold_cents <= limits.AMOUNT_MAX_CENTS:
            raise ValueError("fork_threshold_cents must be between 1 and 10^15")
        if not 0 < self.merge_threshold_cents <= limits.BALANCE_MAX_CENTS:
            raise ValueError("merge_threshold_cents must be positive")
        if not 0 <= self.reinvest_contracts_bps <= 10_000:
            raise ValueError("reinvest_contracts_bps must be between 0 and 10000")
        shares = self.capital_share_bps
        if sorted(shares) != sorted(("generation", "revenue", "compounding")) or any(v < 0 for v in shares.values()) \
                or shares["generation"] + shares["revenue"] > 10_000:
            raise ValueError("capital_share_bps needs generation, revenue and compounding shares summing to 10000 "
                             "at most for the first two")
        if not 1 <= self.portfolio_depth_max <= 1024:
            raise ValueError("portfolio_depth_max must be between 1 and 1024")


DEFAULT_RULES = Rules()

# The account status machine in one table (h11 style): (from, to) pairs that are legal.
STATUS_TRANSITIONS: frozenset[tuple[str, str]] = frozenset({
    ("active", "frozen"),
    ("frozen", "active"),
    ("active", "closed"),
    ("frozen", "closed"),
    ("active", "merged"),
    ("frozen", "merged"),
})
TERMINAL_STATUSES = frozenset({"closed", "merged"})

TRADE_DIRECTIONS = {"premium": "credit", "loss": "debit", "fee": "debit"}


def checked_opened_on(opened_on: date | None, today: date) -> date:
    """The opening day asked for (today if none), between `limits.OPENED_ON_MIN` and today."""
    opened = opened_on or today
    if opened > today:
        raise refuse("validation_failed", "opened_on may not be in the future", field="opened_on")
    if opened < limits.OPENED_ON_MIN:
        raise refuse("validation_failed", f"opened_on may not be before {limits.OPENED_ON_MIN.isoformat()}",
                     field="opened_on")
    return opened


def open_account(*, account_id: str, name: str, account_type: str, owner: str, now: datetime,
                 opened_on: date | None = None, portfolio_id: str | None = None) -> Account:
    opened = checked_opened_on(opened_on, now.date())
    return Account(id=account_id, name=name, type=account_type, owner=owner, portfolio_id=portfolio_id,
                   opened_on=opened, created_at=now, updated_at=now)


def deployable(account: Account, rules: Rules = DEFAULT_RULES) -> int:
    """Balance less the type's cash buffer, rounded down to the cent."""
    buffer_bps = rules.cash_buffer_bps.get(account.type, 0)
    return account.balance * (10_000 - buffer_bps) // 10_000


def transition(account: Account, target: str) -> None:
    """Refuses an illegal status change; returns quietly for a legal one."""
    if (account.status, target) not in STATUS_TRANSITIONS:
        raise refuse("account_not_active", f"account is {account.status}; cannot become {target}",
                     account_id=account.id, status=account.status)


def _change_status(account: Account, target: str, now: datetime) -> list[Event]:
    """The one way to change status: the table decides, and closing needs a zero balance."""
    transition(account, target)
    if target == "closed" and account.balance != 0:
        raise refuse("account_not_empty", "only an account with a zero balance can be closed",
                     account_id=account.id, balance=account.balance)
    return [StatusChanged(account_id=account.id, status=target, at=now)]


def _require_active(account: Account) -> None:
    if account.status != "active":
        raise refuse("account_not_active", f"account is {account.status}", account_id=account.id,
                     status=account.status)


def _require_funds(account: Account, amount: int) -> None:
    if account.balance < amount:
        raise refuse("insufficient_funds", "balance is lower than the amount", account_id=account.id,
                     balance=account.balance, amount=amount)


def _require_room(account: Account, amount: int) -> None:
    if account.balance + amount > limits.BALANCE_MAX_CENTS:
        raise refuse("balance_limit_exceeded", "the credit would take the balance past its limit",
                     account_id=account.id, balance_max=limits.BALANCE_MAX_CENTS)


def _require_withdrawable(account: Account, rules: Rules) -> None:
    if not rules.withdrawals_allowed.get(account.type, True):
        raise refuse("withdrawal_not_allowed", f"{account.type} accounts refuse withdrawals and transfers out",
                     account_id=account.id, type=account.type)


def _effective_date(account: Account, requested: date | None, today: date) -> date:
    if requested is None:
        return today
    if requested > today:
        raise refuse("validation_failed", "effective_date may not be in the future", field="effective_date")
    floor = max(account.opened_on, account.latest_effective_date or account.opened_on)
    if requested < floor:
        raise refuse("validation_failed", f"effective_date may not be before {floor.isoformat()}",
                     field="effective_date")
    return requested


def _no_ids(prefix: str) -> str:
    raise AssertionError("this decision needs new ids; pass new_id")


def decide(account: Account, command: Command, *, transaction_id: str, now: datetime,
           correlation_id: str | None = None, rules: Rules = DEFAULT_RULES,
           new_id: Callable[[str], str] = _no_ids) -> list[Event]:
    """The events `command` causes, or a `Refused` exception. Pure: `now` and ids come
    in (`new_id(prefix)` is called only when a fork needs ids). Every credit to a
    portfolio's Gen-Acc is followed by the fork check (one fork per credit)."""
    events = _decide(account, command, transaction_id=transaction_id, now=now, correlation_id=correlation_id,
                     rules=rules, new_id=new_id)
    if account.type == "generation" and account.portfolio_id is not None and events \
            and isinstance(events[0], LegPosted) and events[0].leg.direction == "credit" \
            and events[0].leg.kind not in ("fork", "merge"):
        # The credit changes only the balance, so the surplus is computed on it directly.
        surplus = account.balance + events[0].leg.amount - account.baseline
        if surplus >= rules.fork_threshold_cents and account.portfolio_depth < rules.portfolio_depth_max:
            events += fork_events(account, surplus, effective=events[0].leg.effective_date, now=now,
                                  new_id=new_id)
    return events


def fork_surplus(account: Account, rules: Rules = DEFAULT_RULES) -> int:
    """What a portfolio Gen-Acc holds above its baseline (0 when it may not fork)."""
    if account.type != "generation" or account.portfolio_id is None or account.status != "active":
        return 0
    return max(0, account.balance - account.baseline)


def fork_events(account: Account, amount: int, *, effective: date, now: datetime,
                new_id: Callable[[str], str]) -> list[Event]:
    """`amount` leaves the Gen-Acc for a new unit under its portfolio: the unit's Gen-Acc
    gets floor(amount / 2) (its baseline) and its Com-Acc the rest. The unit's legs carry
    the effective date of the credit that caused the fork."""
    fork_id = new_id("frk")
    portfolio_id, generation_id, compounding_id = new_id("prt"), new_id("acc"), new_id("acc")
    half = amount // 2
    portfolio = Portfolio(
        id=portfolio_id, name=f"unit {portfolio_id}", owner=account.owner, parent_id=account.portfolio_id,
        root_id=account.root_portfolio_id or account.portfolio_id, depth=account.portfolio_depth + 1,
        generation_account_id=generation_id, compounding_account_id=compounding_id, opened_on=effective,
        created_at=now)
    common = dict(owner=account.owner, portfolio_id=portfolio_id, root_portfolio_id=portfolio.root_id,
                  portfolio_depth=portfolio.depth, opened_on=effective, created_at=now, updated_at=now)
    generation = Account(id=generation_id, name="Gen-Acc", type="generation", baseline=half, **common)
    compounding = Account(id=compounding_id, name="Com-Acc", type="compounding", **common)

    def fork_leg(target: str, direction: str, value: int, counterparty: str) -> LegPosted:
        return LegPosted(leg=Leg(id=new_id("txn"), account_id=target, kind="fork", direction=direction,
                                 amount=value, counterparty_account_id=counterparty, correlation_id=fork_id,
                                 effective_date=effective, created_at=now))

    events: list[Event] = [fork_leg(account.id, "debit", amount, generation_id),
                           PortfolioOpened(portfolio=portfolio, accounts=[generation, compounding])]
    if half > 0:
        events.append(fork_leg(generation_id, "credit", half, account.id))
    if amount - half > 0:
        events.append(fork_leg(compounding_id, "credit", amount - half, account.id))
    return events


def quarter_start(quarter: str) -> date:
    year, number = quarter.split("-Q")
    return date(int(year), 3 * (int(number) - 1) + 1, 1)


def quarter_end(quarter: str) -> date:
    start = quarter_start(quarter)
    following = date(start.year + (start.month == 10), (start.month + 2) % 12 + 1, 1)
    return following - timedelta(days=1)


def quarter_of(day: date) -> str:
    return f"{day.year}-Q{(day.month - 1) // 3 + 1}"


def previous_quarter(day: date) -> str:
    return quarter_of(quarter_start(quarter_of(day)) - timedelta(days=1))


def reinvestment(account: Account, quarter: str, now: datetime, rules: Rules = DEFAULT_RULES) -> Reinvested:
    """Net trade income since the last reinvestment, if positive, splits into contracts
    (75%) and LEAPS (the rest). At most once per account and quarter, in quarter order."""
    if account.type not in rules.reinvested_types:
        raise refuse("reinvest_not_allowed", f"{account.type} accounts do not reinvest", account_id=account.id)
    if account.status in TERMINAL_STATUSES:
        raise refuse("account_not_active", f"account is {account.status}", account_id=account.id)
    if quarter_start(quarter) > now.date():
        raise refuse("validation_failed", "the quarter has not begun", field="quarter")
    if quarter_end(quarter) < account.opened_on:
        raise refuse("quarter_before_opening", "the account opened after that quarter", account_id=account.id)
    if account.last_reinvested_quarter is not None and quarter <= account.last_reinvested_quarter:
        raise refuse("already_reinvested", f"already reinvested for {account.last_reinvested_quarter}",
                     account_id=account.id, quarter=quarter)
    net = max(0, account.trade_income_cents)
    contracts = net * rules.reinvest_contracts_bps // 10_000
    return Reinvested(account_id=account.id, quarter=quarter, net_income=account.trade_income_cents,
                      contracts=contracts, leaps=net - contracts, at=now)


def _decide(account: Account, command: Command, *, transaction_id: str, now: datetime,
            correlation_id: str | None, rules: Rules, new_id: Callable[[str], str]) -> list[Event]:
    today = now.date()

    def leg(kind, direction, amount, memo, counterparty=None, effective=None):
        return [LegPosted(leg=Leg(
            id=transaction_id, account_id=account.id, kind=kind, direction=direction, amount=amount,
            memo=memo, counterparty_account_id=counterparty, correlation_id=correlation_id,
            effective_date=effective or today, created_at=now))]

    match command:   # transfers first: the most frequent commands
        case TransferDebit(to_account=target, amount=amount, memo=memo, override=override):
            _require_active(account)
            if not override:
                _require_withdrawable(account, rules)
            _require_funds(account, amount)
            return leg("transfer", "debit", amount, memo, counterparty=target)
        case TransferCredit(from_account=source, amount=amount, memo=memo):
            _require_active(account)
            _require_room(account, amount)
            return leg("transfer", "credit", amount, memo, counterparty=source)
        case Deposit(amount=amount, memo=memo):
            _require_active(account)
            _require_room(account, amount)
            return leg("deposit", "credit", amount, memo)
        case Withdraw(amount=amount, memo=memo, override=override):
            _require_active(account)
            if not override:
                _require_withdrawable(account, rules)
            _require_funds(account, amount)
            return leg("withdrawal", "debit", amount, memo)
        case BookTrade(kind=kind, amount=amount, memo=memo, effective_date=requested):
            _require_active(account)
            effective = _effective_date(account, requested, today)
            direction = TRADE_DIRECTIONS[kind]
            if direction == "credit":
                _require_room(account, amount)
            else:
                _require_funds(account, amount)
            return leg(kind, direction, amount, memo, effective=effective)
        case Rename(name=name):
            if account.status in TERMINAL_STATUSES:
                raise refuse("account_not_active", f"account is {account.status}", account_id=account.id)
            return [Renamed(account_id=account.id, name=name, at=now)]
        case ChangeStatus(status=status):
            if status == account.status:
                return []
            return _change_status(account, status, now)
        case UpdateAccount(name=name, status=status):
            events: list[Event] = []
            if status is not None and status != account.status:
                events.extend(_change_status(account, status, now))
            elif account.status in TERMINAL_STATUSES:
                raise refuse("account_not_active", f"account is {account.status}", account_id=account.id)
            if name is not None and name != account.name:
                events.append(Renamed(account_id=account.id, name=name, at=now))
            return events
        case Close():
            return _change_status(account, "closed", now)
        case Fork(amount=amount):
            surplus = fork_surplus(account, rules)
            if account.type != "generation" or account.portfolio_id is None:
                raise refuse("fork_not_allowed", "only a portfolio's Gen-Acc forks", account_id=account.id)
            _require_active(account)
            wanted = surplus if amount is None else amount
            if surplus <= 0 or not 0 < wanted <= surplus:
                raise refuse("fork_not_allowed", "the amount must be positive and at most the surplus over the "
                             "baseline", account_id=account.id, surplus=surplus)
            if account.portfolio_depth >= rules.portfolio_depth_max:
                raise refuse("fork_not_allowed", "the fork tree is at its depth limit", account_id=account.id)
            return fork_events(account, wanted, effective=today, now=now, new_id=new_id)
        case MergeOut(to_account=target, effective_date=effective):
            transition(account, "merged")
            dates = [d for d in (effective, account.latest_effective_date) if d is not None]
            events = leg("merge", "debit", account.balance, None, counterparty=target,
                         effective=max(dates, default=None)) if account.balance > 0 else []
            return events + [StatusChanged(account_id=account.id, status="merged", at=now)]
        case MergeIn(portfolio_id=portfolio_id, amount=amount, effective_date=effective):
            _require_active(account)
            _require_room(account, amount)
            dates = [d for d in (effective, account.latest_effective_date) if d is not None]
            events = leg("merge", "credit", amount, None, effective=max(dates, default=None)) if amount else []
            return events + [PortfolioMerged(portfolio_id=portfolio_id, at=now)]
        case Reinvest(quarter=quarter):
            return [reinvestment(account, quarter, now, rules)]
    raise AssertionError(f"unknown command {command!r}")


def apply_leg(balance: int, leg: Leg) -> int:
    """The balance after `leg`. A negative result is a bug upstream (decisions check
    funds first), never a client mistake."""
    after = balance + leg.delta
    assert 0 <= after <= limits.BIGINT_MAX, f"leg {leg.id} would take {leg.account_id} to {after}"
    return after


TRADE_INCOME_SIGN = {"premium": 1, "loss": -1, "fee": -1}


def mutate(account: Account, event: Event) -> Account:
    """The account after one of *its* events (`event.account_id == account.id`)."""
    assert event.account_id == account.id, f"event for {event.account_id} applied to {account.id}"
    match event:
        case LegPosted(leg=leg):
            latest = account.latest_effective_date
            if latest is None or leg.effective_date > latest:
                latest = leg.effective_date
            income = account.trade_income_cents + TRADE_INCOME_SIGN.get(leg.kind, 0) * leg.amount
            return replace(account, balance=apply_leg(account.balance, leg), version=account.version + 1,
                           latest_effective_date=latest, trade_income_cents=income, updated_at=leg.created_at)
        case StatusChanged(status=status, at=at):
            return replace(account, status=status, version=account.version + 1, updated_at=at)
        case Renamed(name=name, at=at):
            return replace(account, name=name, version=account.version + 1, updated_at=at)
        case Reinvested(quarter=quarter, contracts=contracts, leaps=leaps, at=at):
            allocations = Allocations(contracts=account.allocations.contracts + contracts,
                                      leaps=account.allocations.leaps + leaps)
            return replace(account, allocations=allocations, trade_income_cents=0, last_reinvested_quarter=quarter,
                           version=account.version + 1, updated_at=at)
    raise AssertionError(f"unknown event {event!r}")


def mutate_all(account: Account, events: list[Event]) -> Account:
    """Applies the events addressed to `account`, skipping the others (a fork's or a
    transfer's events for other accounts)."""
    for event in events:
        if event.account_id == account.id:
            account = mutate(account, event)
    return account
