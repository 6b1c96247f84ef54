-- Portfolios and their fork tree, reinvestment bookkeeping, and the transactional outbox.
CREATE TABLE portfolios (
    id                      text PRIMARY KEY,
    name                    text NOT NULL,
    owner                   text NOT NULL,
    parent_id               text REFERENCES portfolios (id),
    root_id                 text NOT NULL,
    depth                   integer NOT NULL CHECK (depth >= 0),
    status                  text NOT NULL CHECK (status IN ('active', 'merged')),
    generation_account_id   text NOT NULL,
    revenue_account_id      text,
    compounding_account_id  text NOT NULL,
    opened_on               date NOT NULL,
    created_at              timestamptz NOT NULL,
    merged_at               timestamptz
);
CREATE INDEX portfolios_parent_id ON portfolios (parent_id, id) WHERE parent_id IS NOT NULL;
CREATE INDEX portfolios_root_id ON portfolios (root_id, id);
CREATE INDEX portfolios_owner_id ON portfolios (owner, id);

ALTER TABLE accounts
    ADD COLUMN root_portfolio_id       text,
    ADD COLUMN portfolio_depth         integer NOT NULL DEFAULT 0,
    ADD COLUMN trade_income_cents      bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_reinvested_quarter text;

CREATE TABLE reinvestments (
    account_id  text NOT NULL REFERENCES accounts (id),
    quarter     text NOT NULL,
    net_income  bigint NOT NULL,
    contracts   bigint NOT NULL CHECK (contracts >= 0),
    leaps       bigint NOT NULL CHECK (leaps >= 0),
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, quarter)
);

-- Written in the same statement as the change it describes; `seq` orders the feed (one
-- writer, so commit order).
CREATE TABLE events (
    seq             bigserial PRIMARY KEY,
    type            text NOT NULL,
    account_id      text,
    portfolio_id    text,
    correlation_id  text,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL
);
