-- Live risk flags (derived from the ledger): set when an account's drawdown reaches its
-- type's limit, removed when it recovers; each change writes an event in the same
-- transaction.
CREATE TABLE risk_flags (
    account_id  text NOT NULL REFERENCES accounts (id),
    flag        text NOT NULL,
    since       timestamptz NOT NULL,
    drawdown    double precision NOT NULL,
    PRIMARY KEY (account_id, flag)
);
