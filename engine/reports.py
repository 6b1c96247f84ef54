"""Read models of portfolios, built by pure functions from committed states."""
from __future__ import annotations

from datetime import date, datetime

from msgspec import Struct

from engine.model import Account, Allocations, Portfolio, Reinvested
from engine.rules import DEFAULT_RULES, Rules, deployable


class AccountBalance(Struct, frozen=True, kw_only=True):
    id: str
    name: str
    type: str
    status: str
    balance: int
    deployable: int
    baseline: int
    allocations: Allocations


class Totals(Struct, frozen=True, kw_only=True):
    balance: int
    deployable: int
    generation: int
    revenue: int
    compounding: int


class UnitSummary(Struct, frozen=True, kw_only=True):
    id: str
    status: str
    balance: int


class PortfolioView(Struct, frozen=True, kw_only=True):
    id: str
    name: str
    owner: str
    parent_id: str | None
    root_id: str
    depth: int
    status: str
    opened_on: date
    created_at: datetime
    merged_at: datetime | None
    accounts: list[AccountBalance]
    units: list[UnitSummary]
    totals: Totals


class TreeNode(Struct, frozen=True, kw_only=True):
    id: str
    parent_id: str | None
    depth: int
    status: str
    accounts: list[AccountBalance]
    balance: int
    children: list[str]


class PortfolioTree(Struct, frozen=True, kw_only=True):
    root_id: str
    nodes: list[TreeNode]
    totals: Totals
    units_active: int
    units_merged: int
    truncated: bool


class ReinvestedAccount(Struct, frozen=True, kw_only=True):
    account_id: str
    net_income: int
    contracts: int
    leaps: int


class SkippedAccount(Struct, frozen=True, kw_only=True):
    account_id: str
    code: str


class Reinvestment(Struct, frozen=True, kw_only=True):
    portfolio_id: str
    quarter: str
    accounts: list[ReinvestedAccount]
    skipped: list[SkippedAccount]


def account_balance(account: Account, rules: Rules = DEFAULT_RULES) -> AccountBalance:
    return AccountBalance(id=account.id, name=account.name, type=account.type, status=account.status,
                          balance=account.balance, deployable=deployable(account, rules), baseline=account.baseline,
                          allocations=account.allocations)


def totals(accounts: list[Account], rules: Rules = DEFAULT_RULES) -> Totals:
    by_type = {t: sum(a.balance for a in accounts if a.type == t) for t in ("generation", "revenue", "compounding")}
    return Totals(balance=sum(a.balance for a in accounts), deployable=sum(deployable(a, rules) for a in accounts),
                  **by_type)


def portfolio_view(portfolio: Portfolio, accounts: dict[str, Account], units: list[Portfolio],
                   unit_accounts: dict[str, Account], rules: Rules = DEFAULT_RULES) -> PortfolioView:
    own = [accounts[i] for i in portfolio.account_ids if i in accounts]
    summaries = [UnitSummary(id=u.id, status=u.status,
                             balance=sum(unit_accounts[i].balance for i in u.account_ids if i in unit_accounts))
                 for u in units]
    return PortfolioView(id=portfolio.id, name=portfolio.name, owner=portfolio.owner, parent_id=portfolio.parent_id,
                         root_id=portfolio.root_id, depth=portfolio.depth, status=portfolio.status,
                         opened_on=portfolio.opened_on, created_at=portfolio.created_at, merged_at=portfolio.merged_at,
                         accounts=[account_balance(a, rules) for a in own], units=summaries,
                         totals=totals(own, rules))


def portfolio_tree(root_id: str, portfolios: list[Portfolio], accounts: dict[str, Account], truncated: bool,
                   rules: Rules = DEFAULT_RULES) -> PortfolioTree:
    children: dict[str, list[str]] = {}
    for p in portfolios:
        if p.parent_id is not None:
            children.setdefault(p.parent_id, []).append(p.id)
    nodes = []
    for p in portfolios:
        own = [accounts[i] for i in p.account_ids if i in accounts]
        nodes.append(TreeNode(id=p.id, parent_id=p.parent_id, depth=p.depth, status=p.status,
                              accounts=[account_balance(a, rules) for a in own], balance=sum(a.balance for a in own),
                              children=children.get(p.id, [])))
    units = [p for p in portfolios if p.id != root_id]
    return PortfolioTree(root_id=root_id, nodes=nodes, totals=totals(list(accounts.values()), rules),
                         units_active=sum(1 for u in units if u.status == "active"),
                         units_merged=sum(1 for u in units if u.status == "merged"), truncated=truncated)


def reinvestment_report(portfolio_id: str, quarter: str, events, skipped: list[tuple[str, str]]) -> Reinvestment:
    done = [ReinvestedAccount(account_id=e.account_id, net_income=e.net_income, contracts=e.contracts, leaps=e.leaps)
            for e in events if isinstance(e, Reinvested)]
    return Reinvestment(portfolio_id=portfolio_id, quarter=quarter, accounts=done,
                        skipped=[SkippedAccount(account_id=a, code=c) for a, c in skipped])
