"""Server configuration: the environment, parsed once into a frozen msgspec Struct tree.

Owns: the names, defaults and validation of every setting (DESIGN section 4). `load_config`
reads a mapping (normally `os.environ`) and returns a `Config`; a bad value raises
`ConfigError` whose message is one line naming the variable. Nothing else in the server reads
the environment: the config is passed down.

Which backend runs where: a setting left unset selects the embedded default for that backend
(PostgreSQL from the `pgserver` wheel, chdb, a local artifact directory under `MLRUN_DATA_DIR`),
so mixed configurations (say only `DATABASE_URL` set) just work.

Secrets (`MLRUN_API_KEY`, passwords) are kept in `Secret` wrappers whose repr hides them, so a
config that ends up in a log line or a traceback leaks nothing.

Must not import anything beyond the standard library, msgspec, `mlrun.server.errors` and the
records of `mlrun.server.ports`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, TypeVar, cast
from urllib.parse import unquote, urlsplit

import msgspec

from mlrun.server.errors import ConfigError
from mlrun.server.ports.run_metadata import CardinalityLimits

T = TypeVar("T")

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
# Faults the crash tests inject on cue (MLRUN_FAULT_INJECTION; never set it in production):
# `kill_before_ledger_mark` kills the process with SIGKILL when the write path is about to mark
# its first committed batch in the ledger, i.e. between the ClickHouse commit and the ledger
# update; `kill_before_stream_ack` kills `mlrun process` the same way between its ClickHouse
# insert and the XACK of the entries it carried; `kill_mid_purge` kills `mlrun serve` right after
# a purge job started its ClickHouse deletes, before it recorded their end; `kill_mid_retention`
# right after retention dropped a month, before it rebuilt its runs' summaries and rollups.
FaultInjection = Literal["kill_before_ledger_mark", "kill_before_stream_ack", "kill_mid_purge",
                         "kill_mid_retention"]
IngestMode = Literal["direct", "queued"]


class Secret(msgspec.Struct, frozen=True):
    """A secret string whose repr never shows it."""

    value: str

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    __str__ = __repr__


class ListenConfig(msgspec.Struct, frozen=True):
    host: str = "127.0.0.1"
    http_port: int = 3001
    grpc_port: int = 50051


class AuthConfig(msgspec.Struct, frozen=True):
    bootstrap_api_key: Secret | None = None
    disabled: bool = False


class PostgresConfig(msgspec.Struct, frozen=True):
    """`dsn` None selects the embedded pgserver under the data dir."""

    dsn: Secret | None = None
    max_connections: int = 8


class ClickHouseConfig(msgspec.Struct, frozen=True):
    """`host` None selects embedded chdb under the data dir."""

    host: str | None = None
    port: int = 8123
    user: str = "default"
    password: Secret = Secret("")
    database: str = "mlrun"


class ArtifactStoreConfig(msgspec.Struct, frozen=True):
    """`endpoint` None selects the local artifact directory under the data dir."""

    endpoint: str | None = None
    access_key: str = ""
    secret_key: Secret = Secret("")
    bucket: str = "mlrun-artifacts"
    region: str = "us-east-1"


class IngestConfig(msgspec.Struct, frozen=True):
    mode: IngestMode = "direct"
    # Capacity of each ingest pipeline (metrics, system metrics): what may be queued or in
    # flight to ClickHouse before new batches get 429. Rows cost ~50 bytes each once encoded.
    pipeline_max_rows: int = 2_000_000
    pipeline_max_bytes: int = 128 * 1024 * 1024
    max_body_bytes: int = 16 * 1024 * 1024


class RedisConfig(msgspec.Struct, frozen=True):
    """`REDIS_URL`: redis://[user:password@]host:port[/db]."""

    host: str
    port: int = 6379
    username: str | None = None
    password: Secret | None = None
    db: int = 0


class QueueConfig(msgspec.Struct, frozen=True):
    """Queued ingest (`INGEST_MODE=queued`): the Redis streams between servers and processors.

    Streams are `{stream}:{0..partitions-1}`, a run's batches always in the same one; every
    server and processor of a deployment must agree on `stream`, `partitions` and `group`.
    The bound (entries, bytes) is what the servers admit before answering 429."""

    redis: RedisConfig | None = None
    stream: str = "mlrun:ingest"
    partitions: int = 8
    group: str = "mlrun-processors"
    max_entries: int = 100_000
    max_bytes: int = 512 * 1024 * 1024
    # A processor's pending entries idle this long are claimed by another (it died).
    claim_idle_s: float = 30.0
    processor_http_port: int = 3002
    processor_name: str | None = None  # the consumer name; None: host name and PID
    processor_read_entries: int = 1000


# A century: beyond it, "keep everything" (0) says what is meant.
MAX_RETENTION_DAYS = 36_500


class LifecycleConfig(msgspec.Struct, frozen=True):
    """Deletion, retention and pruning (README "Data lifecycle")."""

    # MLRUN_RETENTION_DAYS: metric points older than this go, by whole UTC months; 0 = never.
    retention_days: int = 0
    ledger_retention_days: float = 7.0
    upload_max_age_h: float = 24.0
    purge_settle_s: float = 30.0
    housekeeping_interval_s: float = 60.0


class Config(msgspec.Struct, frozen=True):
    listen: ListenConfig = ListenConfig()
    auth: AuthConfig = AuthConfig()
    cardinality: CardinalityLimits = CardinalityLimits()
    postgres: PostgresConfig = PostgresConfig()
    clickhouse: ClickHouseConfig = ClickHouseConfig()
    artifacts: ArtifactStoreConfig = ArtifactStoreConfig()
    ingest: IngestConfig = IngestConfig()
    queue: QueueConfig = QueueConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    data_dir: Path = Path("mlrun-data")
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    # How long start-up keeps retrying backends that do not answer yet (a compose stack starts
    # its databases and the server together), and how long shutdown may take in total.
    startup_timeout_s: float = 60.0
    shutdown_timeout_s: float = 8.0
    fault_injection: FaultInjection | None = None

    @property
    def listeners_are_loopback(self) -> bool:
        return is_loopback_host(self.listen.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- parsing -----------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _port(name: str, raw: str) -> int:
    try:
        port = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a port number 0-65535, got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: expected a port number 0-65535, got {raw!r}")
    return port


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _positive_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a positive integer, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, got {raw!r}")
    return value


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a positive number of seconds, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}: expected a positive number of seconds, got {raw!r}")
    return value


def _non_negative_int(name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected a whole number >= 0, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name}: expected a whole number >= 0, got {raw!r}")
    return value


def _retention_days(name: str, raw: str) -> int:
    value = _non_negative_int(name, raw)
    if value > MAX_RETENTION_DAYS:
        raise ConfigError(f"{name}: expected at most {MAX_RETENTION_DAYS} days, got {raw!r}")
    return value


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        lowered = raw.strip().lower()
        if lowered not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
        return lowered

    return parse


def _ingest_mode(name: str, raw: str) -> IngestMode:
    return cast(IngestMode, _choice("direct", "queued")(name, raw))


def _log_level(name: str, raw: str) -> LogLevel:
    return cast(LogLevel, _choice("debug", "info", "warning", "error")(name, raw))


def _log_format(name: str, raw: str) -> LogFormat:
    return cast(LogFormat, _choice("text", "json")(name, raw))


def _fault_injection(name: str, raw: str) -> FaultInjection:
    return cast(FaultInjection,
                _choice("kill_before_ledger_mark", "kill_before_stream_ack",
                        "kill_mid_purge", "kill_mid_retention")(name, raw))


def _host(name: str, raw: str) -> str:
    host = raw.strip()
    if not host or any(c.isspace() or c in "/@?#" for c in host):
        raise ConfigError(f"{name}: expected a host name or IP address, got {raw!r}")
    return host


def _text(name: str, raw: str) -> str:
    if any(ord(c) < 32 for c in raw):
        raise ConfigError(f"{name}: contains control characters")
    return raw


_CONNINFO_PAIR = re.compile(r"^\s*([a-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)\s*")


def _postgres_dsn(name: str, raw: str) -> str:
    """A libpq connection URI (postgresql://...) or key=value string (host=... dbname=...)."""
    if "://" not in raw:
        rest, keys = raw.strip(), []
        while rest:
            pair = _CONNINFO_PAIR.match(rest)
            if pair is None:
                raise ConfigError(f"{name}: expected postgresql://user:password@host:port/dbname "
                                  "or libpq key=value pairs")
            keys.append(pair[1])
            rest = rest[pair.end():]
        if not keys:
            raise ConfigError(f"{name}: empty connection string")
        return raw
    parts = urlsplit(raw)
    if parts.scheme not in ("postgres", "postgresql") or not (parts.hostname or parts.query):
        # Only the scheme is echoed: the rest may carry a password.
        raise ConfigError(
            f"{name}: expected postgresql://user:password@host:port/dbname "
            f"(got a value with scheme {parts.scheme!r})"
        )
    return raw


def _endpoint(name: str, raw: str) -> str:
    """MINIO_ENDPOINT as MinIO's own tools write it (`host:port`) or as a URL."""
    value = raw.strip()
    if "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: expected host:port or http(s)://host:port, got {raw!r}")
    try:
        _ = parts.port
    except ValueError:
        raise ConfigError(f"{name}: bad port in {raw!r}") from None
    return f"{parts.scheme}://{parts.netloc}"


_REDIS_URL_FORM = "redis://[user:password@]host:port[/db]"


def _redis_url(name: str, raw: str) -> RedisConfig:
    """REDIS_URL. Only the scheme is ever echoed: the rest may carry a password."""
    value = raw.strip()
    parts = urlsplit(value)
    if parts.scheme == "rediss":
        raise ConfigError(f"{name}: rediss:// (TLS) is not supported; use redis:// on a private "
                          "network, or a TLS tunnel (stunnel, a sidecar) in front of Redis")
    if parts.scheme != "redis" or not value.startswith("redis://"):
        raise ConfigError(f"{name}: expected {_REDIS_URL_FORM} "
                          f"(got a value with scheme {parts.scheme!r})")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{name}: bad port; expected {_REDIS_URL_FORM}") from None
    if not parts.hostname:
        raise ConfigError(f"{name}: no host; expected {_REDIS_URL_FORM}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name}: query parameters are not supported; expected "
                          f"{_REDIS_URL_FORM}")
    db_text = parts.path[1:] if parts.path.startswith("/") else parts.path
    if db_text and not (db_text.isascii() and db_text.isdigit()):
        raise ConfigError(f"{name}: the database after the host must be a number; expected "
                          f"{_REDIS_URL_FORM}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        raise ConfigError(f"{name}: a user name needs a password; expected {_REDIS_URL_FORM}")
    return RedisConfig(host=parts.hostname, port=6379 if port is None else port,
                       username=username,
                       password=Secret(password) if password is not None else None,
                       db=int(db_text or 0))


def _key_name(name: str, raw: str) -> str:
    if not raw or len(raw) > 100 or not all(c.isprintable() and not c.isspace() for c in raw):
        raise ConfigError(f"{name}: expected 1-100 printable characters without spaces, "
                          f"got {raw!r}")
    return raw


def _database_name(name: str, raw: str) -> str:
    if not raw or not all(c.isalnum() or c == "_" for c in raw):
        raise ConfigError(f"{name}: expected letters, digits and underscores, got {raw!r}")
    return raw


class _Reader:
    """Reads variables from the mapping; empty values count as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self.names_read: set[str] = set()

    def get(self, name: str, parse: Callable[[str, str], T], default: T) -> T:
        self.names_read.add(name)
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        return parse(name, raw)

    def optional(self, name: str, parse: Callable[[str, str], T]) -> T | None:
        self.names_read.add(name)
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return None
        return parse(name, raw)


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse the environment into a Config; raise ConfigError naming the first bad variable."""
    return _load(_Reader(os.environ if environ is None else environ))


def known_variables() -> frozenset[str]:
    """Every environment variable the server reads (for docs and deployment-file checks)."""
    reader = _Reader({})
    _load(reader)
    return frozenset(reader.names_read)


def _load(env: _Reader) -> Config:
    defaults = Config()

    listen = ListenConfig(
        host=env.get("API_HOST", _host, defaults.listen.host),
        http_port=env.get("API_HTTP_PORT", _port, defaults.listen.http_port),
        grpc_port=env.get("API_GRPC_PORT", _port, defaults.listen.grpc_port),
    )
    bootstrap = env.optional("MLRUN_API_KEY", _text)
    auth = AuthConfig(
        bootstrap_api_key=Secret(bootstrap) if bootstrap else None,
        disabled=env.get("MLRUN_AUTH_DISABLED", _bool, False),
    )
    cardinality = CardinalityLimits(
        max_tag_keys_per_run=env.get(
            "MLRUN_MAX_TAG_KEYS_PER_RUN", _positive_int, defaults.cardinality.max_tag_keys_per_run
        ),
        max_metric_names_per_run=env.get(
            "MLRUN_MAX_METRIC_NAMES_PER_RUN",
            _positive_int,
            defaults.cardinality.max_metric_names_per_run,
        ),
        max_tags_per_project=env.get(
            "MLRUN_MAX_TAGS_PER_PROJECT", _positive_int, defaults.cardinality.max_tags_per_project
        ),
    )
    dsn = env.optional("DATABASE_URL", _postgres_dsn)
    postgres = PostgresConfig(
        dsn=Secret(dsn) if dsn else None,
        max_connections=env.get(
            "MLRUN_PG_MAX_CONNECTIONS", _positive_int, defaults.postgres.max_connections
        ),
    )
    clickhouse = ClickHouseConfig(
        host=env.optional("CLICKHOUSE_HOST", _host),
        port=env.get("CLICKHOUSE_PORT", _port, defaults.clickhouse.port),
        user=env.get("CLICKHOUSE_USER", _text, defaults.clickhouse.user),
        password=Secret(env.get("CLICKHOUSE_PASSWORD", _text, "")),
        database=env.get("CLICKHOUSE_DATABASE", _database_name, defaults.clickhouse.database),
    )
    artifacts = ArtifactStoreConfig(
        endpoint=env.optional("MINIO_ENDPOINT", _endpoint),
        access_key=env.get("MINIO_ACCESS_KEY", _text, ""),
        secret_key=Secret(env.get("MINIO_SECRET_KEY", _text, "")),
        bucket=env.get("MINIO_BUCKET", _text, defaults.artifacts.bucket),
        region=env.get("MINIO_REGION", _text, defaults.artifacts.region),
    )
    ingest_defaults = IngestConfig()
    ingest = IngestConfig(
        mode=env.get("INGEST_MODE", _ingest_mode, "direct"),
        pipeline_max_rows=env.get(
            "MLRUN_PIPELINE_MAX_ROWS", _positive_int, ingest_defaults.pipeline_max_rows
        ),
        pipeline_max_bytes=env.get(
            "MLRUN_PIPELINE_MAX_BYTES", _positive_int, ingest_defaults.pipeline_max_bytes
        ),
        max_body_bytes=env.get(
            "MLRUN_MAX_BODY_BYTES", _positive_int, ingest_defaults.max_body_bytes
        ),
    )
    queue = _load_queue(env)
    lifecycle_defaults = LifecycleConfig()
    lifecycle = LifecycleConfig(
        retention_days=env.get("MLRUN_RETENTION_DAYS", _retention_days,
                               lifecycle_defaults.retention_days),
        ledger_retention_days=env.get("MLRUN_LEDGER_RETENTION_DAYS", _positive_float,
                                      lifecycle_defaults.ledger_retention_days),
        upload_max_age_h=env.get("MLRUN_UPLOAD_MAX_AGE_H", _positive_float,
                                 lifecycle_defaults.upload_max_age_h),
        purge_settle_s=env.get("MLRUN_PURGE_SETTLE_S", _positive_float,
                               lifecycle_defaults.purge_settle_s),
        housekeeping_interval_s=env.get("MLRUN_HOUSEKEEPING_INTERVAL_S", _positive_float,
                                        lifecycle_defaults.housekeeping_interval_s),
    )
    config = Config(
        listen=listen,
        auth=auth,
        cardinality=cardinality,
        postgres=postgres,
        clickhouse=clickhouse,
        artifacts=artifacts,
        ingest=ingest,
        queue=queue,
        lifecycle=lifecycle,
        data_dir=Path(env.get("MLRUN_DATA_DIR", _text, str(defaults.data_dir))),
        log_level=env.get("MLRUN_LOG_LEVEL", _log_level, "info"),
        log_format=env.get("MLRUN_LOG_FORMAT", _log_format, "text"),
        startup_timeout_s=env.get(
            "MLRUN_STARTUP_TIMEOUT_S", _positive_float, defaults.startup_timeout_s
        ),
        shutdown_timeout_s=env.get(
            "MLRUN_SHUTDOWN_TIMEOUT_S", _positive_float, defaults.shutdown_timeout_s
        ),
        fault_injection=env.optional("MLRUN_FAULT_INJECTION", _fault_injection),
    )
    _check_combinations(config)
    return config


def _load_queue(env: _Reader) -> QueueConfig:
    defaults = QueueConfig()
    return QueueConfig(
        redis=env.optional("REDIS_URL", _redis_url),
        stream=env.get("MLRUN_QUEUE_STREAM", _key_name, defaults.stream),
        partitions=env.get("MLRUN_QUEUE_PARTITIONS", _positive_int, defaults.partitions),
        group=env.get("MLRUN_QUEUE_GROUP", _key_name, defaults.group),
        max_entries=env.get("MLRUN_QUEUE_MAX_ENTRIES", _positive_int, defaults.max_entries),
        max_bytes=env.get("MLRUN_QUEUE_MAX_BYTES", _positive_int, defaults.max_bytes),
        claim_idle_s=env.get("MLRUN_QUEUE_CLAIM_IDLE_S", _positive_float, defaults.claim_idle_s),
        processor_http_port=env.get("PROCESSOR_HTTP_PORT", _port, defaults.processor_http_port),
        processor_name=env.optional("MLRUN_PROCESSOR_NAME", _key_name),
        processor_read_entries=env.get("MLRUN_PROCESSOR_READ_ENTRIES", _positive_int,
                                       defaults.processor_read_entries),
    )


def check_processor_config(config: Config) -> None:
    """`mlrun process` consumes the queue of queued mode; in direct mode there is none."""
    if config.ingest.mode != "queued":
        raise ConfigError(f"INGEST_MODE: `mlrun process` needs INGEST_MODE=queued "
                          f"(got {config.ingest.mode!r})")


def _check_combinations(config: Config) -> None:
    if config.auth.disabled and not config.listeners_are_loopback:
        raise ConfigError(
            f"MLRUN_AUTH_DISABLED: refused because API_HOST={config.listen.host} is not a "
            "loopback address (auth may only be disabled for a server bound to 127.0.0.1)"
        )
    if config.artifacts.endpoint and not (
        config.artifacts.access_key and config.artifacts.secret_key.value
    ):
        raise ConfigError("MINIO_ACCESS_KEY: MINIO_ENDPOINT is set, so MINIO_ACCESS_KEY and "
                          "MINIO_SECRET_KEY are required")
    if config.ingest.mode == "queued":
        if config.queue.redis is None:
            raise ConfigError(f"REDIS_URL: required with INGEST_MODE=queued ({_REDIS_URL_FORM})")
        # Servers and processors are separate processes sharing the databases: the embedded
        # defaults belong to one process each.
        if config.clickhouse.host is None:
            raise ConfigError("CLICKHOUSE_HOST: INGEST_MODE=queued needs a ClickHouse server "
                              "that the processors write to (embedded chdb is one process's)")
        if config.postgres.dsn is None:
            raise ConfigError("DATABASE_URL: INGEST_MODE=queued needs a PostgreSQL server "
                              "shared by servers and processors (the embedded one is one "
                              "process's)")
