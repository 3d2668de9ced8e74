-- The read path (storage.run_queries.RunQueries). Forward-only, like every schema file here.
--
-- Run listings are keyset-paginated: ORDER BY <sort column>, run_id with a row comparison
-- against the previous page's last row. These indexes let a page be read in index order
-- (stopping after `limit` matches) for the common sorts; tag and param filters are then checked
-- per run through the primary keys of run_tags / run_params (run_id, key), or, when they are
-- selective, started from run_tags_key_value_idx / run_params_key_value_idx (0001) or the
-- numeric index below.

-- Listing across projects, newest first (no project filter).
CREATE INDEX runs_created_idx ON runs (created_at DESC, run_id DESC);

-- Within a project, by last update and by name.
CREATE INDEX runs_project_updated_idx ON runs (project_id, updated_at DESC, run_id DESC);

CREATE INDEX runs_project_name_sort_idx ON runs (project_id, name, run_id);

-- Numeric param comparisons (`lr > 0.01`): the numeric reading of a stored value, NULL unless it
-- is a plain decimal number with at most a 3-digit exponent (so the cast can never fail or
-- overflow). Must stay identical to storage.run_queries.NUMERIC_VALUE, or the planner cannot
-- match it.
CREATE INDEX run_params_key_numeric_idx ON run_params (
    key,
    (CASE WHEN value ~ '^[-+]?([0-9]+([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]{1,3})?$'
        THEN value::numeric END)
);
