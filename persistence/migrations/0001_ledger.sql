-- The ledger: accounts (balance and version updated in the same transaction as their
-- entries), immutable entries (one per leg), and durable idempotency keys.
CREATE TABLE accounts (
    id                    text PRIMARY KEY,
    name                  text NOT NULL,
    type                  text NOT NULL CHECK (type IN ('generation', 'revenue', 'compounding')),
    status                text NOT NULL CHECK (status IN ('active', 'frozen', 'closed', 'merged')),
    owner                 text NOT NULL,
    portfolio_id          text,
    balance               bigint NOT NULL CHECK (balance >= 0),
    baseline              bigint NOT NULL DEFAULT 0 CHECK (baseline >= 0),
    allocation_contracts  bigint NOT NULL DEFAULT 0,
    allocation_leaps      bigint NOT NULL DEFAULT 0,
    version               bigint NOT NULL CHECK (version >= 0),
    opened_on             date NOT NULL,
    latest_effective_date date,
    created_at            timestamptz NOT NULL,
    updated_at            timestamptz NOT NULL
);
CREATE INDEX accounts_owner_id ON accounts (owner, id);
CREATE INDEX accounts_portfolio_id ON accounts (portfolio_id, id) WHERE portfolio_id IS NOT NULL;

CREATE TABLE entries (
    id                      text NOT NULL,
    account_id              text NOT NULL REFERENCES accounts (id),
    sequence                bigint NOT NULL,
    kind                    text NOT NULL,
    direction               text NOT NULL CHECK (direction IN ('credit', 'debit')),
    amount                  bigint NOT NULL CHECK (amount > 0),
    balance_after           bigint NOT NULL CHECK (balance_after >= 0),
    counterparty_account_id text,
    memo                    text,
    correlation_id          text,
    effective_date          date NOT NULL,
    created_at              timestamptz NOT NULL,
    PRIMARY KEY (account_id, sequence)
);
CREATE UNIQUE INDEX entries_id ON entries (id);
CREATE INDEX entries_correlation_id ON entries (correlation_id) WHERE correlation_id IS NOT NULL;

CREATE TABLE idempotency_keys (
    key          text PRIMARY KEY,
    fingerprint  text NOT NULL,
    response     bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
