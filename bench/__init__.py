"""bench: MLRun's load generator (`python -m bench`), the numbers behind issue 3 and issue 7.

Modules (each a noun; the CLI in `__main__` wires them):

    batches      the rows every workload sends: one shape, shared by ingest and baseline
    metrics_store   ClickHouse straight from the bench (server HTTP or chdb): direct inserts
                 for the baseline, counting a workload's points back
    writers      K writers for a fixed duration (threads or anyio tasks), their tallies
    ingest       writers that go through the server: HTTP (columnar `series`) and gRPC
    baseline     writers that insert the same rows straight into the same ClickHouse
    processes    CPU seconds and peak RSS of the server, its backends and the bench itself
    targets      what is benchmarked: a server the bench starts on real backends, on the
                 embedded default, or one given by URL
    suite        the sweep: for each K, baseline then every transport; count back; report
    report       the JSON report and the plain-text table

The bench is not a test: it measures and prints; it never asserts a timing. What it does
check, and report as a failure, is correctness: every acknowledged point stored exactly once.

Must not import `mlrun.server` beyond its pure pieces (`mlrun.server.protocols`) and must not be
imported by `mlrun`. Starting backends reuses the test-suite classes in `tests/backends/` and
`tests/server_process.py` (the bench runs from the repository root).
"""
