-- The ledger keeps the first row version a batch was given at admission (its points carry
-- first_version + i in ClickHouse). A resend of a batch still 'pending' rewrites exactly those
-- rows, and the server can ask ClickHouse whether they are all there already (the commit may
-- have landed while the ledger update did not) before writing anything again.
-- Nullable: rows claimed before this column existed have no recorded versions.
ALTER TABLE ingest_batches ADD COLUMN first_version bigint;
