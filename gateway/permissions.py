"""Who may call what: one table decides every /v1 route for every role, and how an
owner-scoped token is confined on it. `gateway.app` asserts at import that every /v1
route has exactly one entry here, so a new route cannot ship without a decision.

Roles (SPEC section 6):
- admin: everything, including tokens, the audit log, fault injection and overrides;
- operator: runs the books: every account and portfolio operation and the operational
  routes, but not tokens, the audit log or fault injection;
- strategy: the strategy engine: reads, books trade results, reinvests; no deposits,
  withdrawals, transfers, forks, merges or tokens;
- viewer: reads only.

Scopes say how an owner-scoped token is confined on a route:
- ACCOUNT / PORTFOLIO / TRANSACTION: the path names one; another owner's answers 404,
  exactly as if it did not exist;
- BODY_OWNER: the body names the owner of what is created; it must be the token's;
- TRANSFER: both accounts of the body must be the token's owner's (else 404);
- OPERATION: the path names a transfer, fork or merge; unless every leg's account is the
  token's owner's, it answers 404 (checked by the handler, which reads the legs);
- OWNER_FILTER: a list, narrowed to the token's owner;
- NONE: touches no owner's data (a projection, who am I);
- GLOBAL: the whole engine (supervision, tokens, audit, admin): never for a scoped token;
- WEBHOOK: webhook endpoints: a scoped token manages only endpoints of its owner
  (another owner's answer 404) and makes new ones for its owner only (a body naming
  another owner: 403). The handler confines it.
"""
from __future__ import annotations

from dataclasses import dataclass

ADMIN, OPERATOR, STRATEGY, VIEWER = "admin", "operator", "strategy", "viewer"
ROLES = (ADMIN, OPERATOR, STRATEGY, VIEWER)
EVERYONE = frozenset(ROLES)
BOOKKEEPERS = frozenset({ADMIN, OPERATOR})
TRADERS = frozenset({ADMIN, OPERATOR, STRATEGY})
ADMINS = frozenset({ADMIN})

ACCOUNT, PORTFOLIO, TRANSACTION = "account", "portfolio", "transaction"
BODY_OWNER, TRANSFER, OWNER_FILTER, NONE, GLOBAL = "body_owner", "transfer", "owner_filter", "none", "global"
WEBHOOK = "webhook"
OPERATION = "operation"


@dataclass(frozen=True)
class Permission:
    roles: frozenset[str]
    scope: str


PERMISSIONS: dict[tuple[str, str], Permission] = {
    ("POST", "/v1/accounts"): Permission(BOOKKEEPERS, BODY_OWNER),
    ("GET", "/v1/accounts"): Permission(EVERYONE, OWNER_FILTER),
    ("GET", "/v1/accounts/{account_id}"): Permission(EVERYONE, ACCOUNT),
    ("PATCH", "/v1/accounts/{account_id}"): Permission(BOOKKEEPERS, ACCOUNT),
    ("POST", "/v1/accounts/{account_id}/close"): Permission(BOOKKEEPERS, ACCOUNT),
    ("POST", "/v1/accounts/{account_id}/deposits"): Permission(BOOKKEEPERS, ACCOUNT),
    # An override of the no-withdrawal rule is for admins only (checked by the handler).
    ("POST", "/v1/accounts/{account_id}/withdrawals"): Permission(BOOKKEEPERS, ACCOUNT),
    ("POST", "/v1/accounts/{account_id}/trades"): Permission(TRADERS, ACCOUNT),
    ("GET", "/v1/accounts/{account_id}/transactions"): Permission(EVERYONE, ACCOUNT),
    ("POST", "/v1/accounts/{account_id}/fork"): Permission(BOOKKEEPERS, ACCOUNT),
    ("GET", "/v1/accounts/{account_id}/analytics"): Permission(EVERYONE, ACCOUNT),
    ("POST", "/v1/transfers"): Permission(BOOKKEEPERS, TRANSFER),
    ("GET", "/v1/transactions/{transaction_id}"): Permission(EVERYONE, TRANSACTION),
    ("POST", "/v1/portfolios"): Permission(BOOKKEEPERS, BODY_OWNER),
    ("GET", "/v1/portfolios/{portfolio_id}"): Permission(EVERYONE, PORTFOLIO),
    ("GET", "/v1/portfolios/{portfolio_id}/tree"): Permission(EVERYONE, PORTFOLIO),
    ("POST", "/v1/portfolios/{portfolio_id}/merge"): Permission(BOOKKEEPERS, PORTFOLIO),
    ("POST", "/v1/portfolios/{portfolio_id}/reinvest"): Permission(TRADERS, PORTFOLIO),
    ("GET", "/v1/portfolios/{portfolio_id}/analytics"): Permission(EVERYONE, PORTFOLIO),
    ("POST", "/v1/projections"): Permission(EVERYONE, NONE),
    ("GET", "/v1/events"): Permission(EVERYONE, OWNER_FILTER),
    ("GET", "/v1/supervisor/status"): Permission(EVERYONE, GLOBAL),
    ("POST", "/v1/admin/faults"): Permission(ADMINS, GLOBAL),
    ("POST", "/v1/admin/quarantine/{account_id}/release"): Permission(BOOKKEEPERS, GLOBAL),
    ("POST", "/v1/tokens"): Permission(ADMINS, GLOBAL),
    ("GET", "/v1/tokens"): Permission(ADMINS, GLOBAL),
    ("DELETE", "/v1/tokens/{token_id}"): Permission(ADMINS, GLOBAL),
    ("GET", "/v1/audit"): Permission(ADMINS, GLOBAL),
    ("GET", "/v1/audit/verify"): Permission(ADMINS, GLOBAL),
    ("GET", "/v1/whoami"): Permission(EVERYONE, NONE),
    ("POST", "/v1/webhooks"): Permission(ADMINS, WEBHOOK),
    ("GET", "/v1/webhooks"): Permission(ADMINS, WEBHOOK),
    ("GET", "/v1/webhooks/{webhook_id}"): Permission(ADMINS, WEBHOOK),
    ("PATCH", "/v1/webhooks/{webhook_id}"): Permission(ADMINS, WEBHOOK),
    ("DELETE", "/v1/webhooks/{webhook_id}"): Permission(ADMINS, WEBHOOK),
    ("POST", "/v1/webhooks/{webhook_id}/rotate-secret"): Permission(ADMINS, WEBHOOK),
    ("GET", "/v1/webhooks/{webhook_id}/attempts"): Permission(ADMINS, WEBHOOK),
    ("GET", "/v1/webhooks/{webhook_id}/dead-letters"): Permission(ADMINS, WEBHOOK),
    ("POST", "/v1/webhooks/{webhook_id}/dead-letters/retry"): Permission(ADMINS, WEBHOOK),
    ("POST", "/v1/webhooks/{webhook_id}/dead-letters/{event_seq}/retry"): Permission(ADMINS, WEBHOOK),
    # Issue 12: the portfolio list and the operation lookups.
    ("GET", "/v1/portfolios"): Permission(EVERYONE, OWNER_FILTER),
    ("GET", "/v1/transfers/{transfer_id}"): Permission(EVERYONE, OPERATION),
    ("GET", "/v1/forks/{fork_id}"): Permission(EVERYONE, OPERATION),
    ("GET", "/v1/merges/{merge_id}"): Permission(EVERYONE, OPERATION),
}


def allowed(permission: Permission, role: str, owner: str | None) -> bool:
    """May this role (with this owner scope, or None) call the route at all?"""
    if role not in permission.roles:
        return False
    return owner is None or permission.scope != GLOBAL
