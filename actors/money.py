"""Accounts and the money on them: open, update and close an account; deposit, withdraw,
book a trade, transfer.

Each money operation has two doors: keyword arguments, and `*_request` with a request
Struct (the gateway's, decoded once). Both check their input the way decoding does: a
Struct built in code is checked too (`actors.inputs.checked`; its constructor checks
nothing), so no malformed request reaches an account's actor.
Each builds its command(s) and its reply's renderer, then runs through the dispatcher
(`actors/dispatch.py`); a credit to an account of a forked unit is followed by the unit's
merge check (`actors/portfolios.py`) before it is answered."""
from __future__ import annotations

from datetime import date

import msgspec

from actors.account import Decided
from actors.context import override
from actors.dispatch import NO_SKIP
from actors.ids import new_id
from actors.inputs import check_id, checked, validate
from engine import ledger
from engine.errors import ValidationFailed
from engine.model import (
    Account, BookTrade, Close, Deposit, Growth, GrowthOperation, PortfolioOpened, Transaction, Transfer,
    TransferCredit, TransferDebit, UpdateAccount, Withdraw,
)
from engine.requests import (
    CreateAccountRequest, DepositRequest, TradeRequest, TransferRequest, UpdateAccountRequest, WithdrawalRequest,
)
from engine.rules import open_account


class Money:
    def __init__(self, engine) -> None:
        self.dispatch = engine.dispatch
        self.portfolios = engine.portfolios
        self.risk = engine.risk
        self.clock = engine.clock

    async def create_account(self, *, name: str, type: str, owner: str, opened_on: date | None = None,
                             idempotency_key: str | None = None) -> Account:
        request = validate(CreateAccountRequest, name=name, type=type, owner=owner, opened_on=opened_on)

        async def run(idempotency):
            account = open_account(account_id=new_id("acc"), name=request.name, account_type=request.type,
                                   owner=request.owner, opened_on=request.opened_on, now=self.clock())
            rows = ledger.Rows()
            ledger.open_account(rows, account)
            return await self.dispatch.write(rows, account, idempotency)

        return await self.dispatch.idempotent(idempotency_key, ("create_account", None, request), Account, run)

    async def update_account(self, account_id: str, *, name: str | None = None, status: str | None = None,
                             idempotency_key: str | None = None) -> Account:
        request = validate(UpdateAccountRequest, name=name, status=status)
        check_id(account_id)

        async def run(idempotency):
            command = UpdateAccount(name=request.name, status=request.status)
            return await self.dispatch.on_account(account_id, command, _render_account(account_id), idempotency)

        return await self.dispatch.idempotent(idempotency_key, ("update_account", account_id, request),
                                              Account, run)

    async def close_account(self, account_id: str, *, idempotency_key: str | None = None) -> Account:
        check_id(account_id)
        return await self.dispatch.idempotent(
            idempotency_key, ("close_account", account_id, Close()), Account,
            lambda idempotency: self.dispatch.on_account(account_id, Close(), _render_account(account_id),
                                                         idempotency))

    # -- money -----------------------------------------------------------------------
    async def deposit(self, account_id: str, amount: int, *, memo: str | None = None,
                      idempotency_key: str | None = None) -> Transaction:
        return await self._deposit(account_id, validate(DepositRequest, amount=amount, memo=memo), idempotency_key)

    async def deposit_request(self, account_id: str, request: DepositRequest, *,
                              idempotency_key: str | None = None) -> Transaction:
        return await self._deposit(account_id, checked(request, DepositRequest), idempotency_key)

    async def _deposit(self, account_id: str, request: DepositRequest, idempotency_key: str | None) -> Transaction:
        return await self._single_leg("deposit", account_id, request, Deposit(amount=request.amount, memo=request.memo),
                                      idempotency_key)

    async def withdraw(self, account_id: str, amount: int, *, memo: str | None = None,
                       override_reason: str | None = None, idempotency_key: str | None = None) -> Transaction:
        """`override_reason` (admins only over HTTP) withdraws even from an account type
        that refuses withdrawals; the reason is audited."""
        return await self._withdraw(
            account_id, validate(WithdrawalRequest, amount=amount, memo=memo, override_reason=override_reason),
            idempotency_key)

    async def withdraw_request(self, account_id: str, request: WithdrawalRequest, *,
                               idempotency_key: str | None = None) -> Transaction:
        return await self._withdraw(account_id, checked(request, WithdrawalRequest), idempotency_key)

    async def _withdraw(self, account_id: str, request: WithdrawalRequest, idempotency_key: str | None) -> Transaction:
        with override(request.override_reason):
            return await self._single_leg("withdraw", account_id, request,
                                          Withdraw(amount=request.amount, memo=request.memo,
                                                   override=request.override_reason is not None), idempotency_key)

    async def book_trade(self, account_id: str, *, kind: str, amount: int, effective_date: date | None = None,
                         memo: str | None = None, idempotency_key: str | None = None) -> Transaction:
        return await self._book_trade(
            account_id, validate(TradeRequest, kind=kind, amount=amount, effective_date=effective_date, memo=memo),
            idempotency_key)

    async def book_trade_request(self, account_id: str, request: TradeRequest, *,
                                 idempotency_key: str | None = None) -> Transaction:
        return await self._book_trade(account_id, checked(request, TradeRequest), idempotency_key)

    async def _book_trade(self, account_id: str, request: TradeRequest, idempotency_key: str | None) -> Transaction:
        command = BookTrade(kind=request.kind, amount=request.amount, memo=request.memo,
                            effective_date=request.effective_date)
        result = await self._single_leg("trade", account_id, request, command, idempotency_key)
        self.risk.after_trade(account_id, request.kind)
        return result

    async def _single_leg(self, operation: str, account_id: str, request, command, idempotency_key) -> Transaction:
        check_id(account_id)

        async def run(idempotency):
            result = await self.dispatch.on_account(account_id, command, _render_first_leg, idempotency)
            unit = self.portfolios.merge_due(account_id) if result.direction == "credit" else None
            return result if unit is None else _with_merge(result, await self.portfolios.after_credit(unit))

        return await self.dispatch.idempotent(idempotency_key, (operation, account_id, request), Transaction, run)

    async def transfer(self, from_account: str, to_account: str, amount: int, *, memo: str | None = None,
                       override_reason: str | None = None, idempotency_key: str | None = None) -> Transfer:
        """Both legs commit in one database transaction or neither does. `override_reason`
        as for `withdraw`."""
        request = validate(TransferRequest, from_account=from_account, to_account=to_account, amount=amount,
                           memo=memo, override_reason=override_reason)
        with override(request.override_reason):
            return await self._transfer(request, idempotency_key)

    async def transfer_request(self, request: TransferRequest, *, idempotency_key: str | None = None) -> Transfer:
        request = checked(request, TransferRequest)
        with override(request.override_reason):
            return await self._transfer(request, idempotency_key)

    async def _transfer(self, request: TransferRequest, idempotency_key: str | None) -> Transfer:
        if request.from_account == request.to_account:
            raise ValidationFailed("from_account and to_account must differ", {"field": "to_account"})

        async def run(idempotency):
            transfer_id = new_id("xfr")
            now = self.clock()

            def render(decided: Decided) -> Transfer:
                return Transfer(id=transfer_id, kind="transfer", from_account=request.from_account,
                                to_account=request.to_account, amount=request.amount, memo=request.memo,
                                created_at=now, legs=decided.transactions, growth=fork_of(decided))

            steps = [(request.from_account,
                      TransferDebit(to_account=request.to_account, amount=request.amount, memo=request.memo,
                                    override=request.override_reason is not None), NO_SKIP),
                     (request.to_account,
                      TransferCredit(from_account=request.from_account, amount=request.amount, memo=request.memo),
                      NO_SKIP)]
            result = await self.dispatch.run_steps(steps, render, idempotency, correlation_id=transfer_id,
                                                   outbox=ledger.transfer_events, now=now)
            unit = self.portfolios.merge_due(request.to_account)
            return result if unit is None else _with_merge(result, await self.portfolios.after_credit(unit))

        return await self.dispatch.idempotent(idempotency_key, ("transfer", None, request), Transfer, run)


def _render_first_leg(decided: Decided):
    first = decided.transactions[0]
    growth = fork_of(decided)
    return first if growth is None else msgspec.structs.replace(first, growth=growth)


def fork_of(decided: Decided) -> Growth | None:
    """The fork a credit triggered (its id and the new unit), if any."""
    for event in decided.events:
        if type(event) is PortfolioOpened:
            fork_id = next(t.correlation_id for t in decided.transactions if t.kind == "fork")
            return Growth(fork_id=fork_id, unit_id=event.portfolio.id)
    return None


def _with_merge(result, merged: GrowthOperation | None):
    """`result` (a credit's reply) saying which merge followed it, if one did."""
    if merged is None:
        return result
    growth = msgspec.structs.replace(result.growth or Growth(), merge_id=merged.id)
    return msgspec.structs.replace(result, growth=growth)


def _render_account(account_id: str):
    return lambda decided: decided.states[account_id]
