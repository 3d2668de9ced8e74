"""Real backend servers for the test session (PostgreSQL, ClickHouse, S3), one module each."""
