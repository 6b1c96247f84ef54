-- The operation path (issue 10): idempotency keys are checked by their unique index at
-- commit instead of by a read before every keyed operation, compared byte-wise (COLLATE
-- "C": keys are opaque), and kept for a bounded time (a BRIN index on created_at lets
-- the purge find expired keys without a b-tree to maintain per insert).
ALTER TABLE idempotency_keys ALTER COLUMN key TYPE text COLLATE "C";
CREATE INDEX idempotency_keys_created_at ON idempotency_keys USING brin (created_at);

-- The guard at the end of every batch statement: a distinct error for each way a batch
-- can be refused, so the writer can tell a key committed earlier (its operation is
-- answered with the stored result) from a version guard that tripped (a bug or a second
-- writer). Raising rolls back the whole statement.
CREATE FUNCTION alluse_batch_guard(keys_inserted bigint, keys_expected bigint, changed bigint,
                                   changed_expected bigint, merged bigint, merged_expected bigint,
                                   revoked bigint, revoked_expected bigint) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    IF keys_inserted <> keys_expected THEN
        RAISE EXCEPTION 'an idempotency key of this batch was committed before' USING ERRCODE = 'AL001';
    END IF;
    IF changed <> changed_expected OR merged <> merged_expected OR revoked <> revoked_expected THEN
        RAISE EXCEPTION 'batch guard: % of % accounts, % of % merges, % of % revocations', changed,
            changed_expected, merged, merged_expected, revoked, revoked_expected USING ERRCODE = 'AL002';
    END IF;
    RETURN 1;
END $$;
