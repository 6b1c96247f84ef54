-- Webhooks (issue 11): endpoints that receive the outbox's events, every delivery
-- attempt, and the events that exhausted their retry schedule (dead letters).
-- `cursor` is the last event `seq` an endpoint is done with (delivered, dead-lettered or
-- not for it): delivery resumes after it, so a restart neither loses nor reorders events.
-- The signing secrets are kept as they are: an HMAC needs the key itself.
CREATE TABLE webhook_endpoints (
    id                          text PRIMARY KEY,
    url                         text NOT NULL,
    description                 text,
    event_types                 text[],
    owner                       text,
    enabled                     boolean NOT NULL,
    disabled_reason             text,
    secret                      text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    cursor                      bigint NOT NULL CHECK (cursor >= 0),
    last_success_at             timestamptz,
    created_by                  text NOT NULL,
    created_at                  timestamptz NOT NULL,
    updated_at                  timestamptz NOT NULL
);

CREATE TABLE webhook_attempts (
    id                bigserial PRIMARY KEY,
    endpoint_id       text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_seq         bigint NOT NULL,
    message_id        text NOT NULL,
    attempt           integer NOT NULL,
    at                timestamptz NOT NULL,
    outcome           text NOT NULL,
    status            integer,
    latency_ms        double precision NOT NULL,
    response_excerpt  text,
    error             text
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (endpoint_id, id);

CREATE TABLE webhook_dead_letters (
    endpoint_id  text NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_seq    bigint NOT NULL,
    event_type   text NOT NULL,
    -- dead: waiting for an operator; redelivering: an operator asked for another try.
    state        text NOT NULL CHECK (state IN ('dead', 'redelivering')),
    attempts     integer NOT NULL,
    last_outcome text NOT NULL,
    dead_at      timestamptz NOT NULL,
    PRIMARY KEY (endpoint_id, event_seq)
);
