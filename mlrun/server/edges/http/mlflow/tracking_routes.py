"""MLflow's tracking routes: `/api/2.0/mlflow/<resource>/<verb>` and the same under
`/ajax-api/2.0/mlflow/`, translated onto `usecases.mlflow.MlflowTracking`.

Served: experiments create, get, get-by-name, search (POST and GET), update, delete, restore,
set-experiment-tag, delete-experiment-tag; runs create, get, update, delete, restore, search,
log-metric, log-parameter, log-batch, set-tag, delete-tag, log-inputs; metrics get-history and
get-history-bulk-interval; logged-models/search (always empty: MLflow 3 asks it before artifact
access by `runs:/` URI); `GET /version`. Anything else under these prefixes (and under
`/api/3.0/mlflow/`) answers 404 ENDPOINT_NOT_FOUND in MLflow's error shape.

Only translation lives here. Must not import storage or pipelines.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable

from mlrun.server.edges.http.app import Request, Response, Router, RouteSpec
from mlrun.server.edges.http.mlflow.answers import (
    answered,
    decode_body,
    decode_query,
    json_response,
    principal_of,
)
from mlrun.server.errors import InvalidInput, NotFound
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.auth import Authenticator
from mlrun.server.usecases.mlflow.tracking import MlflowTracking
from mlrun.wire import mlflow_messages as m
from mlrun.wire.error_codes import ErrorCode

PREFIXES = ("/api/2.0/mlflow", "/ajax-api/2.0/mlflow")
# Every prefix whose unknown paths answer ENDPOINT_NOT_FOUND in MLflow's shape.
FOREIGN_PREFIXES = (*PREFIXES, "/api/3.0/mlflow", "/ajax-api/3.0/mlflow",
                    "/api/2.0/mlflow-artifacts", "/ajax-api/2.0/mlflow-artifacts")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
MLFLOW_API_VERSION = "3.0.0"

Handler = Callable[[Request], Awaitable[Response]]


def _spec(summary: str, scope: str | None) -> RouteSpec:
    return RouteSpec(summary=summary, scope=scope, response=None, tags=("mlflow",),
                     documented=False)


def _run_id(run_id: str | None, run_uuid: str | None) -> str:
    value = run_id or run_uuid
    if not value:
        raise InvalidInput("run_id is required", code=ErrorCode.INVALID_FIELD, field="run_id")
    return value


def add_mlflow_tracking_routes(router: Router, tracking: MlflowTracking,
                               authenticator: Authenticator) -> None:
    def who(request: Request) -> Principal:
        return principal_of(authenticator, request.headers)

    empty = m.Empty()

    # --- experiments ---------------------------------------------------------------------------

    async def create_experiment(request: Request) -> Response:
        body = decode_body(request.body, m.CreateExperiment)
        return json_response(await tracking.create_experiment(who(request), body))

    async def get_experiment(request: Request) -> Response:
        query = decode_query(request.query, m.ExperimentRef)
        return json_response(m.ExperimentResponse(
            experiment=await tracking.get_experiment(who(request), query.experiment_id)))

    async def get_experiment_by_name(request: Request) -> Response:
        query = decode_query(request.query, m.ExperimentByName)
        return json_response(m.ExperimentResponse(
            experiment=await tracking.get_experiment_by_name(who(request),
                                                             query.experiment_name)))

    async def search_experiments_post(request: Request) -> Response:
        body = decode_body(request.body, m.SearchExperiments)
        return json_response(await tracking.search_experiments(who(request), body))

    async def search_experiments_get(request: Request) -> Response:
        query = decode_query(request.query, m.SearchExperiments, frozenset({"order_by"}))
        return json_response(await tracking.search_experiments(who(request), query))

    async def update_experiment(request: Request) -> Response:
        body = decode_body(request.body, m.UpdateExperiment)
        await tracking.update_experiment(who(request), body.experiment_id,
                                         new_name=body.new_name)
        return json_response(empty)

    async def delete_experiment(request: Request) -> Response:
        body = decode_body(request.body, m.ExperimentRef)
        await tracking.update_experiment(who(request), body.experiment_id,
                                         lifecycle_stage="deleted")
        return json_response(empty)

    async def restore_experiment(request: Request) -> Response:
        body = decode_body(request.body, m.ExperimentRef)
        await tracking.update_experiment(who(request), body.experiment_id,
                                         lifecycle_stage="active")
        return json_response(empty)

    async def set_experiment_tag(request: Request) -> Response:
        body = decode_body(request.body, m.SetExperimentTag)
        await tracking.set_experiment_tag(who(request), body)
        return json_response(empty)

    async def delete_experiment_tag(request: Request) -> Response:
        body = decode_body(request.body, m.DeleteExperimentTag)
        await tracking.delete_experiment_tag(who(request), body)
        return json_response(empty)

    # --- runs ----------------------------------------------------------------------------------

    async def create_run(request: Request) -> Response:
        body = decode_body(request.body, m.CreateRun)
        return json_response(m.RunResponse(run=await tracking.create_run(who(request), body)))

    async def get_run(request: Request) -> Response:
        query = decode_query(request.query, m.RunRef)
        run_id = _run_id(query.run_id, query.run_uuid)
        return json_response(m.RunResponse(run=await tracking.get_run(who(request), run_id)))

    async def update_run(request: Request) -> Response:
        body = decode_body(request.body, m.UpdateRun)
        _run_id(body.run_id, body.run_uuid)
        return json_response(m.UpdateRunResponse(
            run_info=await tracking.update_run(who(request), body)))

    async def delete_run(request: Request) -> Response:
        body = decode_body(request.body, m.RunRef)
        await tracking.set_lifecycle(who(request), _run_id(body.run_id, body.run_uuid),
                                     "deleted")
        return json_response(empty)

    async def restore_run(request: Request) -> Response:
        body = decode_body(request.body, m.RunRef)
        await tracking.set_lifecycle(who(request), _run_id(body.run_id, body.run_uuid),
                                     "active")
        return json_response(empty)

    async def search_runs(request: Request) -> Response:
        body = decode_body(request.body, m.SearchRuns)
        return json_response(await tracking.search_runs(who(request), body))

    def digest(request: Request) -> bytes:
        return hashlib.sha256(request.path.encode() + b"\0" + request.body).digest()

    async def logged(request: Request, batch: m.LogBatch) -> Response:
        """Every logging route answers through this: the batch (a single-value route's as a
        one-item batch), keyed by its own request's digest."""
        await tracking.log_batch(who(request), batch, body_digest=digest(request))
        return json_response(empty)

    async def log_batch(request: Request) -> Response:
        if len(request.body) > m.MAX_BATCH_REQUEST_BYTES:
            raise InvalidInput(f"a log-batch request is at most {m.MAX_BATCH_REQUEST_BYTES}"
                               " bytes", code=ErrorCode.PAYLOAD_TOO_LARGE, field="body")
        return await logged(request, decode_body(request.body, m.LogBatch))

    async def log_metric(request: Request) -> Response:
        body = decode_body(request.body, m.LogMetric)
        batch = m.LogBatch(run_id=_run_id(body.run_id, body.run_uuid), metrics=[m.MetricIn(
            key=body.key, value=body.value, timestamp=body.timestamp, step=body.step)])
        return await logged(request, batch)

    async def log_param(request: Request) -> Response:
        body = decode_body(request.body, m.LogParam)
        batch = m.LogBatch(run_id=_run_id(body.run_id, body.run_uuid),
                           params=[m.KeyValue(key=body.key, value=body.value)])
        return await logged(request, batch)

    async def set_tag(request: Request) -> Response:
        body = decode_body(request.body, m.SetTag)
        batch = m.LogBatch(run_id=_run_id(body.run_id, body.run_uuid),
                           tags=[m.KeyValue(key=body.key, value=body.value)])
        return await logged(request, batch)

    async def delete_tag(request: Request) -> Response:
        body = decode_body(request.body, m.DeleteTag)
        await tracking.delete_tag(who(request), body.run_id, body.key)
        return json_response(empty)

    async def log_inputs(request: Request) -> Response:
        body = decode_body(request.body, m.LogInputs)
        await tracking.log_inputs(who(request), body)
        return json_response(empty)

    # --- metrics -------------------------------------------------------------------------------

    async def get_history(request: Request) -> Response:
        query = decode_query(request.query, m.GetHistory)
        return json_response(await tracking.metric_history(who(request), query))

    async def get_history_bulk_interval(request: Request) -> Response:
        query = decode_query(request.query, m.GetHistoryBulkInterval, frozenset({"run_ids"}))
        return json_response(await tracking.metric_history_bulk_interval(who(request), query))

    async def search_logged_models(request: Request) -> Response:
        who(request).require("read")
        return json_response(empty)

    routes: list[tuple[str, str, Handler, str, str]] = [
        ("POST", "experiments/create", create_experiment, "Create an experiment", "write"),
        ("GET", "experiments/get", get_experiment, "Get an experiment", "read"),
        ("GET", "experiments/get-by-name", get_experiment_by_name,
         "Get an experiment by name", "read"),
        ("POST", "experiments/search", search_experiments_post, "Search experiments", "read"),
        ("GET", "experiments/search", search_experiments_get, "Search experiments", "read"),
        ("POST", "experiments/update", update_experiment, "Rename an experiment", "write"),
        ("POST", "experiments/delete", delete_experiment, "Delete an experiment", "write"),
        ("POST", "experiments/restore", restore_experiment, "Restore an experiment", "write"),
        ("POST", "experiments/set-experiment-tag", set_experiment_tag,
         "Set an experiment tag", "write"),
        ("POST", "experiments/delete-experiment-tag", delete_experiment_tag,
         "Delete an experiment tag", "write"),
        ("POST", "runs/create", create_run, "Create a run", "write"),
        ("GET", "runs/get", get_run, "Get a run", "read"),
        ("POST", "runs/update", update_run, "Update a run", "write"),
        ("POST", "runs/delete", delete_run, "Delete a run (soft)", "write"),
        ("POST", "runs/restore", restore_run, "Restore a run", "write"),
        ("POST", "runs/search", search_runs, "Search runs", "read"),
        ("POST", "runs/log-metric", log_metric, "Log a metric", "write"),
        ("POST", "runs/log-parameter", log_param, "Log a param", "write"),
        ("POST", "runs/log-batch", log_batch, "Log metrics, params and tags", "write"),
        ("POST", "runs/set-tag", set_tag, "Set a run tag", "write"),
        ("POST", "runs/delete-tag", delete_tag, "Delete a run tag", "write"),
        ("POST", "runs/log-inputs", log_inputs, "Log dataset inputs", "write"),
        ("GET", "metrics/get-history", get_history, "A metric's history, paged", "read"),
        ("GET", "metrics/get-history-bulk-interval", get_history_bulk_interval,
         "Downsampled histories of runs", "read"),
        ("POST", "logged-models/search", search_logged_models,
         "Logged models (none are kept)", "read"),
    ]
    for prefix in PREFIXES:
        for method, path, handler, summary, scope in routes:
            router.add(method, f"{prefix}/{path}", answered(handler), _spec(summary, scope))

    async def version(request: Request) -> Response:
        return Response(status=200, body=MLFLOW_API_VERSION.encode(), content_type="text/plain")

    router.add("GET", "/version", version, _spec("The MLflow API version served", None))


def add_mlflow_fallback_routes(router: Router) -> None:
    """ENDPOINT_NOT_FOUND for every other path under the MLflow prefixes (added last: the
    router takes the first match)."""

    async def not_served(request: Request) -> Response:
        raise NotFound(f"{request.method} {request.path} is not served by this server",
                       code=ErrorCode.ROUTE_NOT_FOUND)

    for prefix in FOREIGN_PREFIXES:
        for method in METHODS:
            router.add(method, f"{prefix}/{{rest}}", answered(not_served),
                       _spec("Not served (ENDPOINT_NOT_FOUND)", None), path_tail=True)
