"""MLRun: self-hosted ML experiment tracking.

This package's top level is the SDK's public face:

    run = mlrun.init(project="vision", name=None, run_id=None, tags=None, config=None)
    run.log({"loss": 0.3, "acc": 0.9}, step=None)    # or mlrun.log(...) on the active run
    run.log_params({...}); run.log_tags({...})
    run.log_artifact(path, name=None, type="file", wait=False)  # -> progress handle
    run.flush(timeout_s=None); run.finish(status="finished"); run.statistics()
    with mlrun.init(...) as run: ...                  # an exception marks the run failed

The SDK lives in `mlrun.sdk` (see `mlrun.sdk.run`); the server lives in `mlrun.server` and is
started by `mlrun serve` (see `mlrun.__main__`). Importing `mlrun` must stay cheap: nothing here
may import the server or a storage driver, and the SDK itself is imported on first use of one of
the names below (module `__getattr__`), so a server process never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mlrun.sdk.errors import RunClosed, RunRejected, SdkError
    from mlrun.sdk.run import (
        Run,
        active_run,
        finish,
        flush,
        init,
        log,
        log_artifact,
        log_params,
        log_tags,
    )
    from mlrun.sdk.settings import Settings
    from mlrun.sdk.statistics import RunStatistics

_SDK_EXPORTS = {
    "Run": "mlrun.sdk.run",
    "active_run": "mlrun.sdk.run",
    "finish": "mlrun.sdk.run",
    "flush": "mlrun.sdk.run",
    "init": "mlrun.sdk.run",
    "log": "mlrun.sdk.run",
    "log_artifact": "mlrun.sdk.run",
    "log_params": "mlrun.sdk.run",
    "log_tags": "mlrun.sdk.run",
    "Settings": "mlrun.sdk.settings",
    "RunStatistics": "mlrun.sdk.statistics",
    "SdkError": "mlrun.sdk.errors",
    "RunClosed": "mlrun.sdk.errors",
    "RunRejected": "mlrun.sdk.errors",
}

__all__ = [
    "Run",
    "RunClosed",
    "RunRejected",
    "RunStatistics",
    "SdkError",
    "Settings",
    "__version__",
    "active_run",
    "finish",
    "flush",
    "init",
    "log",
    "log_artifact",
    "log_params",
    "log_tags",
]


def __getattr__(name: str) -> Any:
    module_name = _SDK_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mlrun' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value
