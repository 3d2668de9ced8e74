"""ClickHouse: the HTTP and embedded (chdb) clients behind one protocol, schema migrations, and
the metric reads."""
