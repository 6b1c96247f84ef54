-- The lean batch (issue 10): a batch's rows go in by binary COPY.
--
-- Outbox payloads are `json`, not `jsonb`: the engine encodes each payload once and
-- PostgreSQL only checks it, instead of converting every event into jsonb's binary
-- form (about a sixth of the database's work per transfer). Nothing queries inside a
-- payload; the feed returns it as stored.
ALTER TABLE events ALTER COLUMN payload TYPE json USING payload::json;

-- An entry's account is guaranteed by the batch itself: every entry changes its
-- account's balance and version, and the batch's guarded update of that account (or its
-- insert in the same batch) must find it, or the whole batch rolls back. The foreign
-- key repeated that check as a locking lookup per entry.
ALTER TABLE entries DROP CONSTRAINT IF EXISTS entries_account_id_fkey;
