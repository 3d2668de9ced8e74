"""MLRun: self-hosted ML experiment tracking.

This package's top level is the SDK's public face (init, log, log_params, finish, Run);
the server lives in `mlrun.server` and is started by `mlrun serve` (see `mlrun.__main__`).
Importing `mlrun` must stay cheap: nothing here may import the server or a storage driver.
"""

from __future__ import annotations

__version__ = "0.1.0"
