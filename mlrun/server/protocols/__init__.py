"""Pure protocol code: request building, row encoding and error parsing for ClickHouse's HTTP
interface and for S3 (SigV4). No I/O and no event-loop imports here (no anyio, httpx, psycopg):
every function is a plain function, unit-tested without a loop."""
