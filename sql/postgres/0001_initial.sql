-- The metadata schema (PostgreSQL 15 and 16). Forward-only: never edit this file once released,
-- add 0002_*.sql instead. One statement per ;-terminated block, no ; inside literals or comments
-- (see migrations.split_statements). Metric points live in ClickHouse, not here.
--
-- Conventions: timestamps are timestamptz set by the database (now()); ids chosen by the server
-- or client are text; children of a run disappear with it (ON DELETE CASCADE); a run's project
-- cannot be deleted while it has runs.
-- Key/value columns carry length CHECKs below btree's ~2700-byte index entry limit, so an
-- oversized value is rejected by a clear constraint instead of an index error.

CREATE TABLE projects (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 256),
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE runs (
    run_id text PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES projects (id),
    name text NOT NULL DEFAULT '' CHECK (octet_length(name) <= 1024),
    status text NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'finished', 'failed', 'killed')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    last_heartbeat_at timestamptz,
    -- A run is finished exactly when it has left 'running'.
    CONSTRAINT runs_finished_at_matches_status
        CHECK ((status = 'running') = (finished_at IS NULL))
);

-- Listing a project's runs newest first with keyset pagination:
--   WHERE project_id = $1 AND (created_at, run_id) < ($2, $3)
--   ORDER BY created_at DESC, run_id DESC LIMIT n
-- Both columns descend so the row comparison walks the index in one direction.
CREATE INDEX runs_project_created_idx ON runs (project_id, created_at DESC, run_id DESC);

-- The same listing filtered by status.
CREATE INDEX runs_project_status_created_idx
    ON runs (project_id, status, created_at DESC, run_id DESC);

-- Finding running runs whose heartbeat stopped (the stale-run sweeper), across projects.
CREATE INDEX runs_running_heartbeat_idx ON runs (last_heartbeat_at) WHERE status = 'running';

-- Name search within a project: equality and prefix (lower(name) LIKE 'abc%'), case-insensitive.
-- pg_trgm is not available in every deployment (pgserver ships without it), so no substring index.
CREATE INDEX runs_project_name_idx ON runs (project_id, lower(name) text_pattern_ops);

CREATE TABLE run_params (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    key text NOT NULL CHECK (octet_length(key) BETWEEN 1 AND 256),
    value text NOT NULL CHECK (octet_length(value) <= 2048),
    PRIMARY KEY (run_id, key)
);

-- Filtering runs by a param value (key = $1 AND value = $2).
CREATE INDEX run_params_key_value_idx ON run_params (key, value);

CREATE TABLE run_tags (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    key text NOT NULL CHECK (octet_length(key) BETWEEN 1 AND 256),
    value text NOT NULL CHECK (octet_length(value) <= 2048),
    PRIMARY KEY (run_id, key)
);

CREATE INDEX run_tags_key_value_idx ON run_tags (key, value);

-- Distinct tag keys ever used in a project: the durable side of the cardinality limit
-- (MLRUN_MAX_TAGS_PER_PROJECT). Insert with ON CONFLICT DO NOTHING, count per project.
CREATE TABLE project_tag_keys (
    project_id bigint NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    key text NOT NULL CHECK (octet_length(key) BETWEEN 1 AND 256),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, key)
);

-- Distinct metric names of a run (MLRUN_MAX_METRIC_NAMES_PER_RUN); the points are in ClickHouse.
CREATE TABLE run_metric_names (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    name text NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 256),
    PRIMARY KEY (run_id, name)
);

CREATE TABLE artifacts (
    artifact_id text PRIMARY KEY,
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    name text NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 1024),
    type text NOT NULL DEFAULT 'file',
    size_bytes bigint NOT NULL DEFAULT 0 CHECK (size_bytes >= 0),
    sha256 text CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    mime_type text NOT NULL DEFAULT 'application/octet-stream',
    -- Object key in the artifact store (S3 or the local directory); never reused.
    storage_key text NOT NULL UNIQUE,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'finalized')),
    -- S3 multipart upload id while a multipart upload is in progress.
    upload_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    finalized_at timestamptz,
    CONSTRAINT artifacts_finalized_at_matches_status
        CHECK ((status = 'finalized') = (finalized_at IS NOT NULL))
);

CREATE INDEX artifacts_run_created_idx ON artifacts (run_id, created_at);

CREATE TABLE api_keys (
    key_id text PRIMARY KEY,
    name text NOT NULL DEFAULT '',
    -- The first characters of the secret, shown in listings so people can tell keys apart.
    display_prefix text NOT NULL,
    -- Hash of the whole secret; the secret itself is never stored.
    key_hash bytea NOT NULL UNIQUE,
    scopes text[] NOT NULL DEFAULT '{}',
    -- NULL: the key is not limited to one project.
    project_id bigint REFERENCES projects (id) ON DELETE CASCADE,
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at timestamptz
);

-- The idempotency ledger: one row per accepted ingest batch. A retried batch_id with the same
-- payload_hash is answered from here; a different hash under the same batch_id is a conflict.
CREATE TABLE ingest_batches (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    batch_id text NOT NULL CHECK (octet_length(batch_id) BETWEEN 1 AND 256),
    payload_hash bytea NOT NULL,
    seq bigint,
    points integer NOT NULL CHECK (points >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, batch_id)
);

-- Pruning old ledger rows (DELETE ... WHERE created_at < $1).
CREATE INDEX ingest_batches_created_idx ON ingest_batches (created_at);
