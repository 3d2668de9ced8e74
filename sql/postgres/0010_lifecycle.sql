-- Data lifecycle (mlrun.server.usecases.lifecycle, storage.postgres.lifecycle): run and project
-- deletion with a durable purge job, retention rebuilds, pruning. Forward-only, like every
-- schema file here.
--
-- Deleting a run removes its `runs` row at once (params, tags, metric names and artifact rows go
-- with it by ON DELETE CASCADE), so every read answers 404 from that moment; what is left
-- elsewhere is purged by a job: its points in ClickHouse, its artifact objects, its ledger rows.
--
-- The ledger no longer cascades from `runs`: a long run holds one ledger row per batch, and
-- deleting them is the purge job's work in bounded chunks, not the DELETE request's. Claims
-- still check the run in the same statement (metadata._CLAIM_SQL), so no row is claimed for a
-- run that is gone; a claim racing the delete leaves a row the job removes.
ALTER TABLE ingest_batches DROP CONSTRAINT IF EXISTS ingest_batches_run_id_fkey;

-- One job per DELETE request (a run, or a project with all its runs). `state` is what callers
-- see (GET /api/v1/purge_jobs/{job_id}); `phase` where the worker resumes after a restart.
-- The job starts at `not_before` (the settle time: batches admitted before the delete finish
-- committing first). `project` is the project's name, for the access check of scoped keys.
CREATE TABLE purge_jobs (
    job_id text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('run', 'project')),
    target text NOT NULL,
    project text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running', 'done')),
    phase text NOT NULL DEFAULT 'objects'
        CHECK (phase IN ('objects', 'clickhouse', 'ledger', 'done')),
    runs integer NOT NULL CHECK (runs >= 0),
    objects_total integer NOT NULL DEFAULT 0,
    objects_deleted integer NOT NULL DEFAULT 0,
    points_removed bigint,
    clickhouse_seconds double precision,
    ledger_rows_deleted bigint NOT NULL DEFAULT 0,
    worker text,
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    not_before timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT purge_jobs_finished_at_matches_state
        CHECK ((state = 'done') = (finished_at IS NOT NULL))
);

CREATE INDEX purge_jobs_open_idx ON purge_jobs (created_at) WHERE state <> 'done';

-- The runs a job purges. A row here is also the run id's tombstone: creating a run with that
-- id is refused (409 run_deleting) until the job is done and removes its rows.
CREATE TABLE purge_runs (
    run_id text PRIMARY KEY,
    job_id text NOT NULL REFERENCES purge_jobs (job_id) ON DELETE CASCADE
);

CREATE INDEX purge_runs_job_idx ON purge_runs (job_id);

-- The artifact objects a job deletes (copied from `artifacts` before its rows went away).
CREATE TABLE purge_objects (
    job_id text NOT NULL REFERENCES purge_jobs (job_id) ON DELETE CASCADE,
    artifact_id text NOT NULL,
    name text NOT NULL,
    storage_key text NOT NULL,
    upload_id text,
    PRIMARY KEY (job_id, artifact_id)
);

-- Runs whose ClickHouse summaries and block rollups retention must rebuild: recorded before a
-- partition is dropped, removed once rebuilt, so a crash in between resumes the rebuild.
CREATE TABLE retention_rebuilds (
    run_id text PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Finding unfinalized uploads older than the upload age limit.
CREATE INDEX artifacts_pending_created_idx ON artifacts (created_at) WHERE status = 'pending';
