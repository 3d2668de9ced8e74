-- The summary view stops keeping the set of every step (uniqExactState(step) AS step_count).
--
-- Why: nothing reads it. A series' distinct step count comes from the block rollups
-- (metric_blocks, 0002: popcounts of per-block step masks, exact and replay-safe), and
-- summaries read only min/max/last. Yet that state was the costliest part of every insert's
-- summary: a hash set of the block's steps per (run, name), stored again (8 bytes per point)
-- and re-merged by every background merge of the summary's parts, so a long run's summary
-- merges rewrote all of its steps each time. Measured on 18.16 (inserts of 4000 rows, the
-- server's size at 8 writers, ClickHouse CPU per row, best of three on a shared 2-core box):
-- plain MergeTree 3.4 µs, the schema of 0001+0002 8.5 µs, without the step set 4.2 µs.
--
-- How, forward-only and readable by 18.16 and chdb: the table keeps its columns (the old
-- parts keep their step sets until merged; `step_count` is dead, never read); a second view
-- fills it with an empty step set (18.16 wants every column of a view's target:
-- `uniqExactStateIf(step, 0)` adds nothing and costs a branch per row), then the first view
-- goes.
-- While both views exist an insert lands in the summary twice, which is harmless: min, max,
-- argMax and max are idempotent. A re-run after a crash in between is harmless for the same
-- reason.
CREATE MATERIALIZED VIEW IF NOT EXISTS metrics_summary_mv2 TO metrics_summary
AS SELECT
    run_id,
    name,
    minState(value) AS min_value,
    maxState(value) AS max_value,
    argMaxState(value, (step, version)) AS last_value,
    maxState(step) AS last_step,
    uniqExactStateIf(step, 0) AS step_count
FROM metrics
GROUP BY run_id, name;

DROP TABLE IF EXISTS metrics_summary_mv;
