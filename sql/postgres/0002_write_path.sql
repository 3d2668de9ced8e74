-- The write path (storage.metadata.MetadataStore). Forward-only, like every schema file here.
--
-- Projects get the description of POST /api/v1/projects.
--
-- The idempotency ledger gets a state: a batch is claimed as 'pending' in the same transaction
-- that checks its run and cardinality, and set to 'committed' only after its points were written
-- to ClickHouse. A second arrival of the same batch therefore learns whether the first attempt
-- finished ('committed': answer duplicate, write nothing) or may have died half way ('pending':
-- write again, which is harmless because metrics are last-write-wins per run, metric and step).
-- New rows default to 'pending', the state from which nothing can be lost.

ALTER TABLE projects
    ADD COLUMN description text NOT NULL DEFAULT '' CHECK (octet_length(description) <= 8192);

ALTER TABLE ingest_batches
    ADD COLUMN state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'committed'));

ALTER TABLE ingest_batches ADD COLUMN committed_at timestamptz;

ALTER TABLE ingest_batches ADD CONSTRAINT ingest_batches_committed_at_matches_state
    CHECK ((state = 'committed') = (committed_at IS NOT NULL));
