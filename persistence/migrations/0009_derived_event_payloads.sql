-- Derived event payloads (issue 10): a `transfer.posted` or `transaction.posted` event
-- whose payload is exactly its own ledger entries, in the shape the engine replied with,
-- stores no payload. Its entries are already written in the same commit, and the readers
-- (the feed, webhooks, an idempotency key's answer) rebuild the payload from them, to the
-- same bytes (`persistence.store.derived_payloads`). This was the largest row a transfer
-- wrote: about 1 KB of its ~2.8 KB, and a third of its WAL.
--
-- A `transfer.posted` names its entries by its correlation id; a `transaction.posted` by
-- its account and `entry_sequence`, the entry's place in that account's ledger (the
-- entries' primary key). Events written before this migration keep their payloads.
ALTER TABLE events
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN entry_sequence bigint,
    ADD CONSTRAINT events_payload_or_entries CHECK (
        payload IS NOT NULL
        OR (type = 'transfer.posted' AND correlation_id IS NOT NULL)
        OR (type = 'transaction.posted' AND account_id IS NOT NULL AND entry_sequence IS NOT NULL));
