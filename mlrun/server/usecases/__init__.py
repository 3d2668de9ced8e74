"""The use-cases: ingest, queries, artifacts, keys and access. Each checks the caller's scope and
orders the work; storage and the write path are reached only through `mlrun.server.ports`."""
