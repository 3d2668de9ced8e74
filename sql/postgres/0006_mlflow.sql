-- State the MLflow tracking API needs and MLRun's own model lacks (mlrun.server.storage.postgres
-- .mlflow_state). Forward-only, like every schema file here. Side tables keyed by the rows they
-- extend, so runs and projects stay the one storage model: an MLflow experiment IS a project,
-- an MLflow run IS a run; rows here only add what MLflow shows besides.
--
-- Experiments: lifecycle stage (soft delete) and last update time; a project without a row here
-- is an active experiment created when the project was.

CREATE TABLE mlflow_experiments (
    project_id bigint PRIMARY KEY REFERENCES projects (id) ON DELETE CASCADE,
    lifecycle_stage text NOT NULL DEFAULT 'active'
        CHECK (lifecycle_stage IN ('active', 'deleted')),
    last_update_ms bigint NOT NULL
);

CREATE TABLE mlflow_experiment_tags (
    project_id bigint NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    key text NOT NULL CHECK (octet_length(key) BETWEEN 1 AND 256),
    value text NOT NULL CHECK (octet_length(value) <= 2048),
    PRIMARY KEY (project_id, key)
);

-- Runs: the client's start and end times (its own clock, which its metric timestamps share),
-- the user, and the lifecycle stage. A run without a row here (logged by the MLRun SDK) starts
-- at its created_at, ends at finished_at, and is active.
CREATE TABLE mlflow_runs (
    run_id text PRIMARY KEY REFERENCES runs (run_id) ON DELETE CASCADE,
    start_time_ms bigint NOT NULL,
    end_time_ms bigint,
    user_id text NOT NULL DEFAULT '' CHECK (octet_length(user_id) <= 256),
    lifecycle_stage text NOT NULL DEFAULT 'active'
        CHECK (lifecycle_stage IN ('active', 'deleted'))
);

-- Datasets a run used (runs/log-inputs), one row per (run, dataset name, digest); the dataset
-- record as MLflow sent it (name, digest, source_type, source, schema, profile) and the input
-- tags (mlflow.data.context).
CREATE TABLE mlflow_run_inputs (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    name text NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 500),
    digest text NOT NULL CHECK (octet_length(digest) <= 256),
    dataset jsonb NOT NULL,
    tags jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (run_id, name, digest)
);

-- Step-less MLflow histories (every point at step 0, each with its own timestamp): the
-- timestamp of the first step-0 point of each (run, metric). That point is stored at step 0;
-- any other step-0 point at a synthetic step (milliseconds since the run's start), so the
-- history stays whole and plots over time (README "Using MLRun from MLflow").
CREATE TABLE mlflow_step0_origins (
    run_id text NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    name text NOT NULL CHECK (octet_length(name) BETWEEN 1 AND 256),
    first_ms bigint NOT NULL,
    PRIMARY KEY (run_id, name)
);
