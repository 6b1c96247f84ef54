"""What /openapi.json (and so /docs) says about each operation beyond its shapes: a
description, request examples, and the error codes the route can answer with. Keyed by
handler name; `tests/test_http_conveniences.py` checks every route has an entry."""
from __future__ import annotations

ACCOUNT_BUSY = ["overloaded", "database_unavailable", "account_reloading", "account_restarting",
                "account_quarantined", "operation_timeout"]
READ_BUSY = ["overloaded", "database_unavailable"]
KEY = ["idempotency_key_reused"]


class Doc:
    __slots__ = ("description", "example", "conflicts", "unavailable")

    def __init__(self, description: str, example: dict | None = None, conflicts: list[str] | None = None,
                 unavailable: list[str] | None = None):
        self.description = description
        self.example = example
        self.conflicts = conflicts or []
        self.unavailable = unavailable if unavailable is not None else READ_BUSY


ACC = "acc_019a2b3c4d5e6f708192a3b4c5d6"
ACC_2 = "acc_019a2b3c4d5e6f708192a3b4c5d7"

DOCS: dict[str, Doc] = {
    "create_account": Doc("A standalone account of one type, balance 0, outside any portfolio (it never forks).",
                          {"name": "Ann Rev-Acc", "type": "revenue", "owner": "ann"}, KEY, ACCOUNT_BUSY),
    "list_accounts": Doc("Accounts in id (creation) order. Pass `next_cursor` back as `cursor` for the next page; "
                         "it is null on the last page. An owner-scoped token sees only its owner's."),
    "get_account": Doc("The committed state: `balance`, `deployable` (balance less the type's cash buffer), "
                       "`baseline` (a Gen-Acc's opening balance) and `version`."),
    "update_account": Doc("Rename, freeze (reads only) or unfreeze.", {"status": "frozen"},
                          ["account_not_active"] + KEY, ACCOUNT_BUSY),
    "close_account": Doc("Closing is final and needs a zero balance.", None,
                         ["account_not_empty", "account_not_active"] + KEY, ACCOUNT_BUSY),
    "deposit": Doc("Credits the account. Send an `Idempotency-Key` so a retry cannot post twice; a replay answers "
                   "with the first result and `Idempotency-Replayed: true`.", {"amount": 250000, "memo": "wire"},
                   ["account_not_active", "balance_limit_exceeded"] + KEY, ACCOUNT_BUSY),
    "withdraw": Doc("Debits the account. Compounding accounts refuse (`withdrawal_not_allowed`) unless an admin "
                    "gives an `override_reason` (audited).", {"amount": 10000},
                    ["insufficient_funds", "account_not_active", "withdrawal_not_allowed"] + KEY, ACCOUNT_BUSY),
    "book_trade": Doc("A trade result from the strategy engine: `premium` credits, `loss` and `fee` debit. A credit "
                      "to a portfolio's Gen-Acc may fork a unit; a credit in a unit may merge it.",
                      {"kind": "premium", "amount": 150000, "effective_date": "2026-11-27"},
                      ["insufficient_funds", "account_not_active", "balance_limit_exceeded"] + KEY, ACCOUNT_BUSY),
    "list_transactions": Doc("Newest first, each with `balance_after`. Pass `next_cursor` back as `cursor`."),
    "transfer": Doc("Both legs commit in one transaction or neither does. The reply's `id` is readable at "
                    "/v1/transfers/{id}.", {"from_account": ACC, "to_account": ACC_2, "amount": 50000},
                    ["insufficient_funds", "account_not_active", "withdrawal_not_allowed",
                     "balance_limit_exceeded"] + KEY, ACCOUNT_BUSY),
    "get_transaction": Doc("One ledger entry; the legs of a transfer, fork or merge share its `correlation_id`."),
    "create_portfolio": Doc("A root portfolio: the capital is split 40/30/30 into a Gen-Acc, a Rev-Acc and a Com-Acc.",
                            {"name": "Ann Income", "owner": "ann", "initial_capital": 25000000}, KEY, ACCOUNT_BUSY),
    "list_portfolios": Doc("Root portfolios in creation order, each with its whole tree's totals and active units. "
                           "An owner-scoped token sees only its owner's."),
    "get_portfolio": Doc("The portfolio's accounts, its direct units and totals (committed state)."),
    "portfolio_tree": Doc("Every unit below the portfolio, breadth first (bounded; `truncated` says so)."),
    "merge_portfolio": Doc("Moves every balance of a forked unit to the root's Com-Acc in one commit; the unit's "
                           "accounts become `merged`. The reply's `id` is readable at /v1/merges/{id}.", None,
                           ["merge_not_allowed", "account_not_active"] + KEY, ACCOUNT_BUSY),
    "reinvest_portfolio": Doc("Allocates each Rev-Acc's and Com-Acc's positive net trade income since its last "
                              "reinvestment, 75% contracts / 25% LEAPS; at most once per account and quarter.",
                              {"quarter": "2026-Q4"},
                              ["already_reinvested", "reinvest_not_allowed", "quarter_before_opening"] + KEY,
                              ACCOUNT_BUSY),
    "fork": Doc("A manual fork of a portfolio Gen-Acc: `amount` (default the whole surplus over its baseline) "
                "leaves for a new unit, half to its Gen-Acc, the rest to its Com-Acc. The reply's `id` is readable "
                "at /v1/forks/{id}.", {"amount": 5000000}, ["fork_not_allowed", "account_not_active",
                                                           "insufficient_funds"] + KEY, ACCOUNT_BUSY),
    "account_analytics": Doc("Weekly returns, time-weighted and annualized return, volatility, Sharpe, drawdowns, "
                             "risk flags and score, trend and a forecast (docs/analytics.md)."),
    "portfolio_analytics": Doc("The same for a portfolio and its units, with the fork tree's growth."),
    # No example: the fuzzer grows an example's figures to their limits, and a projection
    # of huge returns over many weeks forks without end (its cost is bounded, not small).
    "project": Doc("Simulates a portfolio week by week with the live rules; changes nothing."),
    "list_events": Doc("Committed events (the outbox) in commit order. Pass `next_cursor` back as `cursor` (or "
                       "`next_after` as `after`, the older names) to poll for what commits next. A `payload` has "
                       "the fields of the REST shape of the same thing, by the same names (a `portfolio.forked` "
                       "those of `GET /v1/forks/{fork_id}`, an `account.opened` those of the account; "
                       "docs/growth.md lists them)."),
    "supervisor_status": Doc("Each supervisor's accounts (running, passivated, quarantined), restarts, mailbox "
                             "depths, and the writer's queue."),
    "inject_fault": Doc("Tests only: with fault injection on, the account's actor fails on its next message. "
                        "Otherwise this route does not exist (404).", {"account_id": ACC, "fault": "crash"}),
    "release_quarantine": Doc("An operator's decision: a quarantined account takes operations again. 404 when it "
                              "is not quarantined."),
    "create_token": Doc("The secret is in this reply only; it is stored as a hash.",
                        {"name": "ann dashboard", "role": "viewer", "owner": "ann"}),
    "list_tokens": Doc("Every token, revoked ones too, never their secrets."),
    "revoke_token": Doc("The token fails at once."),
    "list_audit": Doc("Oldest first. Each record's `details` is an object (`details_text` is the exact text its "
                      "hash covers). Pass `next_cursor` back as `cursor`."),
    "verify_audit": Doc("Recomputes the hash chain from the first record."),
    "whoami": Doc("The presented token's id, role and owner scope."),
    "get_transfer": Doc("A transfer by the `id` its reply carried: both legs, debit first."),
    "get_fork": Doc("A fork (manual or automatic) by its id: the Gen-Acc's debit and the new unit's credits; "
                    "`portfolio_id` is the unit it created."),
    "get_merge": Doc("A merge by its id: the unit's debits and the root Com-Acc's credits; `portfolio_id` is the "
                     "unit it emptied."),
    "health": Doc("The process is up."),
    "ready": Doc("Recovery is done and the database answers."),
    "metrics": Doc("Prometheus text exposition."),
    "openapi": Doc("This document. Public: it holds no secrets."),
    # Webhooks (docs/webhooks.md): admin only.
    "create_webhook": Doc("Registers an HTTPS endpoint for the event feed. The signing secret (`whsec_...`) is shown "
                          "only in this reply; deliveries are signed the Standard Webhooks way. Each `event_types` "
                          "entry (a type, `family.*` or `*`) must match a type the engine emits (docs/webhooks.md).",
                          {"url": "https://hooks.example.com/alluse", "event_types": ["portfolio.forked"]}),
    "list_webhooks": Doc("Every webhook endpoint, without secrets."),
    "get_webhook": Doc("One webhook endpoint, its state and counters."),
    "update_webhook": Doc("Changes the URL, the event types, the description or `enabled`.", {"enabled": False}),
    "delete_webhook": Doc("Deletes an endpoint; nothing more is delivered to it."),
    "rotate_webhook_secret": Doc("A new signing secret (shown only here); the old one keeps signing beside it "
                                 "for the grace period."),
    "list_webhook_attempts": Doc("Every delivery attempt, oldest first: time, status, latency, a bounded excerpt."),
    "list_dead_letters": Doc("Events that exhausted their retry schedule."),
    "retry_dead_letters": Doc("Redelivers every dead letter of the endpoint (202)."),
    "retry_dead_letter": Doc("Redelivers one dead letter (202)."),
}
