"""Implementations of the write-path port (`mlrun.server.ports.write_path`): the in-process
group-commit pipeline into ClickHouse today; a queue-backed one plugs in beside it."""
