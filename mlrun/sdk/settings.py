"""The SDK's configuration: keyword arguments over environment variables over defaults,
parsed once into a frozen `Settings` record and passed down.

    variable                          argument                   default
    MLRUN_SERVER_URL                  server_url                 http://127.0.0.1:3001
    MLRUN_API_KEY                     api_key                    (none)
    MLRUN_TRANSPORT                   transport                  http      (http | grpc)
    MLRUN_GRPC_TARGET                 grpc_target                <server URL host>:50051
    MLRUN_OFFLINE                     offline                    false     (spool only; sync later)
    MLRUN_SPOOL_DIR                   spool_dir                  ~/.mlrun/spool
    MLRUN_SPOOL_MAX_BYTES             spool_max_bytes            1 GiB     (per run spool directory)
    MLRUN_BATCH_MAX_POINTS            max_batch_points           20000     (<= the server's 100000)
    MLRUN_BATCH_MAX_BYTES             max_batch_bytes            4 MiB     (estimated JSON bytes)
    MLRUN_BATCH_MAX_AGE_S             max_batch_age_s            0.05
    MLRUN_QUEUE_MAX_BATCHES           max_queued_batches         16        (batches kept in memory)
    MLRUN_MAX_BATCHES_IN_FLIGHT       max_batches_in_flight      1         (at most; see sender)
    MLRUN_REQUEST_TIMEOUT_S           request_timeout_s          10
    MLRUN_INIT_TIMEOUT_S              init_timeout_s             10
    MLRUN_FINISH_TIMEOUT_S            finish_timeout_s           30
    MLRUN_OFFLINE_AFTER_S             offline_after_s            5         (then spool + probe)
    MLRUN_BACKOFF_MAX_S               backoff_max_s              10
    MLRUN_SYSTEM_METRICS_INTERVAL_S   system_metrics_interval_s  0         (0 = off)

A bad value raises `SettingsError` whose message starts with the variable (or argument) name.

Memory bound of a run: at most `max_queued_batches` formed batches (as Python objects, about
110 bytes per point: 16 x 20000 points is ~35 MB), plus the batch being built, plus at most
4 x `max_batch_points` raw log() entries waiting for the batcher. Past that, batches spill to
the spool (see `mlrun.sdk.outbox`).

Must not import httpx, grpc or anything from `mlrun.server` (importing `mlrun` stays cheap).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from mlrun.sdk.errors import SettingsError
from mlrun.wire.schemas import MAX_POINTS_PER_BATCH

T = TypeVar("T")

Transport = Literal["http", "grpc"]

DEFAULT_SERVER_URL = "http://127.0.0.1:3001"
DEFAULT_GRPC_PORT = 50051


def default_spool_dir() -> Path:
    return Path.home() / ".mlrun" / "spool"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    server_url: str = DEFAULT_SERVER_URL
    api_key: str | None = dataclasses.field(default=None, repr=False)  # never in a log line
    transport: Transport = "http"
    grpc_target: str | None = None  # None: derived from server_url (see `resolved_grpc_target`)
    offline: bool = False
    spool_dir: Path = dataclasses.field(default_factory=default_spool_dir)
    spool_max_bytes: int = 1 << 30
    max_batch_points: int = 20_000
    max_batch_bytes: int = 4 << 20
    max_batch_age_s: float = 0.05
    max_queued_batches: int = 16
    max_batches_in_flight: int = 1
    request_timeout_s: float = 10.0
    init_timeout_s: float = 10.0
    finish_timeout_s: float = 30.0
    offline_after_s: float = 5.0
    backoff_base_s: float = 0.1
    backoff_max_s: float = 10.0
    max_retry_after_s: float = 60.0
    heartbeat_interval_s: float = 30.0
    system_metrics_interval_s: float = 0.0

    @property
    def resolved_grpc_target(self) -> str:
        if self.grpc_target:
            return self.grpc_target
        host = urlsplit(self.server_url).hostname or "127.0.0.1"
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return f"{host}:{DEFAULT_GRPC_PORT}"

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then the environment, then `overrides` (keyword arguments win)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, (variable, parse) in _ENVIRONMENT.items():
            raw = env.get(variable)
            if raw is not None and raw.strip() != "":
                values[name] = _parse(variable, raw.strip(), parse)
        known = {field.name for field in dataclasses.fields(cls)}
        for name, value in overrides.items():
            if name not in known:
                raise SettingsError(f"{name}: not a setting (known: {', '.join(sorted(known))})")
            if value is not None:
                values[name] = value
        settings = cls(**values)
        settings.check()
        return settings

    def __post_init__(self) -> None:
        # Accept a str (or any os.PathLike) for the directory, as arguments usually are.
        if not isinstance(self.spool_dir, Path):
            object.__setattr__(self, "spool_dir", Path(self.spool_dir).expanduser())

    def check(self) -> None:
        """Validate the combined values (arguments are checked here, not while parsing)."""
        scheme = urlsplit(self.server_url).scheme
        if scheme not in ("http", "https"):
            raise SettingsError(
                f"{_label('server_url')}: expected http:// or https://, got {self.server_url!r}"
            )
        if self.transport not in ("http", "grpc"):
            raise SettingsError(
                f"{_label('transport')}: expected 'http' or 'grpc', got {self.transport!r}"
            )
        if not 1 <= self.max_batch_points <= MAX_POINTS_PER_BATCH:
            raise SettingsError(
                f"{_label('max_batch_points')}: must be between 1 and {MAX_POINTS_PER_BATCH} "
                f"(the server's cap per batch), got {self.max_batch_points}"
            )
        for name in ("spool_max_bytes", "max_batch_bytes", "max_queued_batches",
                     "max_batches_in_flight"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{_label(name)}: must be at least 1")
        for name in (
            "max_batch_age_s", "request_timeout_s", "init_timeout_s", "finish_timeout_s",
            "offline_after_s", "backoff_base_s", "backoff_max_s", "max_retry_after_s",
            "heartbeat_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{_label(name)}: must be a positive number of seconds")
        if self.system_metrics_interval_s < 0:
            raise SettingsError(
                f"{_label('system_metrics_interval_s')}: must be >= 0 (0 turns it off)"
            )


def _label(name: str) -> str:
    """`name` plus its environment variable, so the message fits both ways of setting it."""
    entry = _ENVIRONMENT.get(name)
    return f"{name} ({entry[0]})" if entry else name


def _parse(variable: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{variable}: {exc}") from None


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _transport(raw: str) -> str:
    if raw.lower() not in ("http", "grpc"):
        raise ValueError(f"expected http or grpc, got {raw!r}")
    return raw.lower()


def _int(raw: str) -> int:
    try:
        return int(raw.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected an integer, got {raw!r}") from None


def _float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number, got {raw!r}") from None


def _text(raw: str) -> str:
    return raw


_ENVIRONMENT: dict[str, tuple[str, Callable[[str], Any]]] = {
    "server_url": ("MLRUN_SERVER_URL", lambda raw: raw.rstrip("/")),
    "api_key": ("MLRUN_API_KEY", _text),
    "transport": ("MLRUN_TRANSPORT", _transport),
    "grpc_target": ("MLRUN_GRPC_TARGET", _text),
    "offline": ("MLRUN_OFFLINE", _bool),
    "spool_dir": ("MLRUN_SPOOL_DIR", lambda raw: Path(raw).expanduser()),
    "spool_max_bytes": ("MLRUN_SPOOL_MAX_BYTES", _int),
    "max_batch_points": ("MLRUN_BATCH_MAX_POINTS", _int),
    "max_batch_bytes": ("MLRUN_BATCH_MAX_BYTES", _int),
    "max_batch_age_s": ("MLRUN_BATCH_MAX_AGE_S", _float),
    "max_queued_batches": ("MLRUN_QUEUE_MAX_BATCHES", _int),
    "max_batches_in_flight": ("MLRUN_MAX_BATCHES_IN_FLIGHT", _int),
    "request_timeout_s": ("MLRUN_REQUEST_TIMEOUT_S", _float),
    "init_timeout_s": ("MLRUN_INIT_TIMEOUT_S", _float),
    "finish_timeout_s": ("MLRUN_FINISH_TIMEOUT_S", _float),
    "offline_after_s": ("MLRUN_OFFLINE_AFTER_S", _float),
    "backoff_max_s": ("MLRUN_BACKOFF_MAX_S", _float),
    "system_metrics_interval_s": ("MLRUN_SYSTEM_METRICS_INTERVAL_S", _float),
}
