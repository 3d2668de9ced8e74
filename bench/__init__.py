"""bench: MLRun's load generator (`python -m bench`), the numbers behind issues 3, 7 and 15.

Modules (each a noun; the CLI in `__main__` wires them):

    batches      the rows every workload sends: one shape, shared by ingest and baseline
    metrics_store   ClickHouse straight from the bench (server HTTP or chdb): direct inserts
                 for the baseline and the references, counting a workload's points back
    writers      K writers for a fixed duration (threads or anyio tasks), their tallies
    ingest       writers that go through the server: HTTP (`series` or `rows` wire form), gRPC
    baseline     writers that insert the same rows straight into the same ClickHouse
    reference    large direct INSERTs into a plain MergeTree and into `metrics` with its views
    processes    CPU seconds and peak RSS of the server, its backends and the bench itself
    server_telemetry   the server's INSERT counters from its /metrics
    stages       which ingest stage a sampled server stack belongs to (pure)
    profiler     py-spy on the server during a workload: its CPU per point by stage
    targets      what is benchmarked: a server the bench starts on real backends, on the
                 embedded default, or one given by URL
    suite        the sweep: for each K, baseline then every transport; the breakdown; the
                 references; count back; report
    report       the JSON report and the plain-text table
    queued       `--workloads queued`: direct against queued mode on a deployment of its own
    purge        `python -m bench.purge`: a deleted run's purge speed (points/s removed from
                 ClickHouse) while another run is written to

The bench is not a test: it measures and prints; it never asserts a timing. What it does
check, and report as a failure, is correctness: every acknowledged point stored exactly once.

Must not import `mlrun.server` beyond its pure pieces (`mlrun.server.protocols`) and must not be
imported by `mlrun`. Starting backends reuses the test-suite classes in `tests/backends/` and
`tests/server_process.py` (the bench runs from the repository root).
"""
