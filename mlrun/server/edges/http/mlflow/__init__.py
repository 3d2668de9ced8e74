"""The MLflow-compatible HTTP edge: MLflow's tracking REST API (`/api/2.0/mlflow/...`, the same
under `/ajax-api/2.0/mlflow/...`) and its proxied artifact service
(`/api/2.0/mlflow-artifacts/...`), so the official `mlflow` client and the frameworks' MLflow
loggers work against MLRun with `MLFLOW_TRACKING_URI` pointed at it.

- `answers`: MLflow's error shape and codes, and its credentials (Bearer or Basic with the API
  key as password) mapped onto ours;
- `tracking_routes`: experiments, runs, logging, history (on `usecases.mlflow.MlflowTracking`);
- `artifact_routes`: the artifact proxy (on `usecases.artifacts.Artifacts`).

Only translation lives here; the mapping itself is `mlrun.server.usecases.mlflow`. Must not
import storage or pipelines.
"""

from __future__ import annotations

from mlrun.server.edges.http.app import Router
from mlrun.server.edges.http.mlflow.artifact_routes import add_mlflow_artifact_routes
from mlrun.server.edges.http.mlflow.tracking_routes import (
    add_mlflow_fallback_routes,
    add_mlflow_tracking_routes,
)
from mlrun.server.usecases.artifacts import Artifacts
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.mlflow.tracking import MlflowTracking


def add_mlflow_routes(router: Router, tracking: MlflowTracking, artifacts: Artifacts,
                      authenticator: Authenticator) -> None:
    """Mount the MLflow surface; its fallback (ENDPOINT_NOT_FOUND) goes last."""
    add_mlflow_tracking_routes(router, tracking, authenticator)
    add_mlflow_artifact_routes(router, artifacts, authenticator)
    add_mlflow_fallback_routes(router)
