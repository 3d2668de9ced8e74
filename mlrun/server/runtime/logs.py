"""Process-wide logging set-up: one line per event, as text or JSON (`MLRUN_LOG_FORMAT`).

Owns: the root handler and formatters. Log records never carry secrets: the config's secrets
are `Secret` wrappers that render as `***`, and no module logs request headers or bodies.
Must not import anything from the server beyond `mlrun.server.runtime.config`.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

import msgspec

from mlrun.server.runtime.config import LogFormat, LogLevel

_encoder = msgspec.json.Encoder()


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(entry).decode()


def configure_logging(level: LogLevel, fmt: LogFormat) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # hypercorn logs every connection at info, httpx every request to ClickHouse or S3 (a line
    # per flush, which costs real time under load) and pgserver every command it runs with its
    # whole output; keep their warnings and errors only.
    for chatty in ("hypercorn", "httpx", "httpcore", "pgserver"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    # pgserver's platformdirs warns once per start that XDG_RUNTIME_DIR is unset (normal for a
    # service) and falls back to /tmp; the message says nothing an operator can act on.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
