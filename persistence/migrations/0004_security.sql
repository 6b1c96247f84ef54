-- Security: API tokens (stored only as a SHA-256 of their secret) and the audit log,
-- an append-only hash chain written in the same transaction as the change it records.
CREATE TABLE api_tokens (
    id           text PRIMARY KEY,
    name         text NOT NULL,
    role         text NOT NULL CHECK (role IN ('admin', 'operator', 'strategy', 'viewer')),
    owner        text,
    secret_hash  text NOT NULL UNIQUE,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL,
    revoked_at   timestamptz
);

CREATE TABLE audit_log (
    seq          bigint PRIMARY KEY,
    at           timestamptz NOT NULL,
    token_id     text NOT NULL,
    role         text NOT NULL,
    owner_scope  text,
    action       text NOT NULL,
    target       text,
    request_id   text NOT NULL,
    client       text NOT NULL,
    outcome      text NOT NULL,
    -- JSON text, not jsonb: the hash covers the exact stored text.
    details      text NOT NULL,
    prev_hash    text NOT NULL,
    hash         text NOT NULL
);

-- Append-only: ordinary writers cannot change or remove a record. (A superuser can
-- disable the trigger; the hash chain is what makes that evident.)
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit log is append-only';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
