"""PostgreSQL: the connection pool, the embedded server, and the stores of runs, the batch
ledger, artifact rows, API keys and run listings."""
