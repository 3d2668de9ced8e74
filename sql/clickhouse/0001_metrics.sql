-- Metric series, their per-(run, metric) summaries, and system metrics.
--
-- Runs unchanged on ClickHouse 18.16 (Debian server) and chdb (ClickHouse 26): no DateTime64
-- (epoch milliseconds as Int64), no Map, no TTL (retention drops monthly partitions), no codecs.
-- LowCardinality(String) needs allow_experimental_low_cardinality_type=1 in the 18.16 server's
-- users.xml profile; ClickHouse 26 has it by default and rejects that setting, so the client
-- never sends it.
--
-- `version` is the server's ingest order: for one (run_id, name, step) the highest version wins
-- (ReplacingMergeTree(version) at merge time; FINAL or argMax(..., version) at query time).
-- ReplacingMergeTree replaces only inside one partition: a step re-logged with a timestamp in a
-- different month keeps both rows until the query deduplicates with argMax.
-- Partitions are UTC calendar months whatever the server's time zone, so retention (DROP
-- PARTITION 'YYYYMM') means the same on every server.

CREATE TABLE IF NOT EXISTS metrics
(
    run_id String,
    name LowCardinality(String),
    step Int64,
    value Float64,
    timestamp_ms Int64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(toDateTime(intDiv(timestamp_ms, 1000), 'UTC'))
ORDER BY (run_id, name, step);

-- Summaries are aggregate *states* merged at query time with the -Merge functions
-- (minMerge(min_value), argMaxMerge(last_value), uniqExactMerge(step_count), ...). A replayed
-- batch cannot skew them: min/max/argMax are idempotent and step_count counts distinct steps.
-- last_value is the value at the highest (step, version). min/max cannot forget a value that a
-- later write of the same step replaced: they cover every value ever written.
CREATE TABLE IF NOT EXISTS metrics_summary
(
    run_id String,
    name LowCardinality(String),
    min_value AggregateFunction(min, Float64),
    max_value AggregateFunction(max, Float64),
    last_value AggregateFunction(argMax, Float64, Tuple(Int64, UInt64)),
    last_step AggregateFunction(max, Int64),
    step_count AggregateFunction(uniqExact, Int64)
)
ENGINE = AggregatingMergeTree
ORDER BY (run_id, name);

CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_summary_mv TO metrics_summary
AS SELECT
    run_id,
    name,
    minState(value) AS min_value,
    maxState(value) AS max_value,
    argMaxState(value, (step, version)) AS last_value,
    maxState(step) AS last_step,
    uniqExactState(step) AS step_count
FROM metrics
GROUP BY run_id, name;

CREATE TABLE IF NOT EXISTS system_metrics
(
    run_id String,
    name LowCardinality(String),
    step Int64,
    value Float64,
    timestamp_ms Int64,
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(toDateTime(intDiv(timestamp_ms, 1000), 'UTC'))
ORDER BY (run_id, name, timestamp_ms);
