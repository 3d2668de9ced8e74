"""ClickHouse: the `ClickHouse` protocol (client), its HTTP and embedded (chdb) transports, the
schema applier (migrations), and the read path's SQL (metric_reads, bucket_sql)."""
