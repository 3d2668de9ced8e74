-- Runs created by `mlrun import` (usecases.archive): which export each came from, so importing
-- the same file (or an export of the same, unchanged run) again recognises the run and writes
-- nothing, while a run of the same id that was not imported, or was imported from different
-- content, is refused instead of being merged into. Forward-only, like every schema file here.
--
-- content_sha256 is the run's digest from the export file (its run_end record): the SHA-256 of
-- the run's lines, independent of when or by whom it was exported.

CREATE TABLE run_imports (
    run_id text PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    content_sha256 text NOT NULL CHECK (content_sha256 ~ '^[0-9a-f]{64}$'),
    imported_at timestamptz NOT NULL DEFAULT now()
);
