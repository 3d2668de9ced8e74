"""Storage clients: PostgreSQL (metadata), ClickHouse (metrics) and the artifact store, each in
its production form and its embedded default. These modules do I/O; the request/response
formats they speak live in `mlrun.server.protocols`. Must not import the HTTP or gRPC edges."""
