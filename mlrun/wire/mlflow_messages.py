"""MLflow tracking REST messages (the subset MLRun serves), as msgspec Structs.

The shapes are MLflow's own (`mlflow/protos/service.proto`, JSON with proto field names):
ids are strings, int64 are JSON numbers, enums are names (`"RUNNING"`), unset fields are
omitted (`omit_defaults`). Requests accept unknown fields (newer clients send more, e.g.
`model_id`) and doubles or int64 as numbers or strings (the client sends NaN and ±Infinity as
`"NaN"`, `"Infinity"`, `"-Infinity"`; GET parameters arrive as strings and are converted
non-strictly). Limits are MLflow's (`mlflow/utils/validation.py`) and are checked by the server
so that a violation is MLflow's 400 INVALID_PARAMETER_VALUE.

Must not import anything from `mlrun.server` or `mlrun.sdk`.
"""

from __future__ import annotations

import enum
from typing import Any

from msgspec import Struct

# MLflow's limits (the client assumes the server enforces them).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
MAX_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_REQUEST_BYTES = 1024 * 1024
MAX_SEARCH_RESULTS = 50_000
DEFAULT_SEARCH_RESULTS = 1000
MAX_HISTORY_PAGE = 25_000
MAX_BULK_INTERVAL_RUNS = 100
MAX_BULK_INTERVAL_POINTS = 2500
MAX_EXPERIMENT_NAME_CHARS = 500

Number = float | int | str


class Message(Struct, kw_only=True, omit_defaults=True):
    """Base of the MLflow messages: unset fields are omitted when encoded. Messages holding only
    scalars are `gc=False`: a log-batch decodes a thousand of them, which would otherwise be
    tracked by (and trigger) the cyclic garbage collector."""


# --- shared ---------------------------------------------------------------------------------


class KeyValue(Message, gc=False):
    key: str
    value: str = ""


class MetricIn(Message, gc=False):
    key: str
    value: Number
    timestamp: Number = 0
    step: Number = 0


class MetricOut(Message, gc=False):
    key: str
    value: float
    timestamp: int
    step: int


class MetricWithRun(Message, gc=False):
    key: str
    value: float
    timestamp: int
    step: int
    run_id: str


class Experiment(Message):
    experiment_id: str
    name: str
    artifact_location: str
    lifecycle_stage: str
    creation_time: int
    last_update_time: int
    tags: list[KeyValue] = []


class RunInfo(Message):
    run_id: str
    run_uuid: str
    run_name: str
    experiment_id: str
    user_id: str
    status: str
    start_time: int
    artifact_uri: str
    lifecycle_stage: str
    end_time: int | None = None


class RunData(Message):
    metrics: list[MetricOut] = []
    params: list[KeyValue] = []
    tags: list[KeyValue] = []


class DatasetInputMessage(Message):
    dataset: dict[str, Any]
    tags: list[KeyValue] = []


class RunInputs(Message):
    dataset_inputs: list[DatasetInputMessage] = []


class Run(Message):
    info: RunInfo
    data: RunData
    inputs: RunInputs


# --- experiments ------------------------------------------------------------------------------


class CreateExperiment(Message):
    name: str
    artifact_location: str | None = None
    tags: list[KeyValue] = []


class CreateExperimentResponse(Message):
    experiment_id: str


class ExperimentRef(Message):
    experiment_id: str


class ExperimentByName(Message):
    experiment_name: str


class ExperimentResponse(Message):
    experiment: Experiment


class SearchExperiments(Message):
    max_results: int = DEFAULT_SEARCH_RESULTS
    filter: str | None = None
    order_by: list[str] = []
    view_type: str = "ACTIVE_ONLY"
    page_token: str | None = None


class SearchExperimentsResponse(Message):
    experiments: list[Experiment] = []
    next_page_token: str | None = None


class UpdateExperiment(Message):
    experiment_id: str
    new_name: str | None = None


class SetExperimentTag(Message):
    experiment_id: str
    key: str
    value: str = ""


class DeleteExperimentTag(Message):
    experiment_id: str
    key: str


# --- runs -----------------------------------------------------------------------------------


class CreateRun(Message):
    experiment_id: str = "0"
    user_id: str = ""
    run_name: str | None = None
    start_time: Number | None = None
    tags: list[KeyValue] = []


class RunResponse(Message):
    run: Run


class RunRef(Message):
    run_id: str | None = None
    run_uuid: str | None = None


class UpdateRun(Message):
    run_id: str | None = None
    run_uuid: str | None = None
    status: str | None = None
    end_time: Number | None = None
    run_name: str | None = None


class UpdateRunResponse(Message):
    run_info: RunInfo


class SearchRuns(Message):
    experiment_ids: list[str] = []
    filter: str | None = None
    run_view_type: str = "ACTIVE_ONLY"
    max_results: int = DEFAULT_SEARCH_RESULTS
    order_by: list[str] = []
    page_token: str | None = None


class SearchRunsResponse(Message):
    runs: list[Run] = []
    next_page_token: str | None = None


class LogMetric(Message):
    key: str
    value: Number
    run_id: str | None = None
    run_uuid: str | None = None
    timestamp: Number = 0
    step: Number = 0


class LogParam(Message):
    key: str
    run_id: str | None = None
    run_uuid: str | None = None
    value: str = ""


class SetTag(Message):
    key: str
    run_id: str | None = None
    run_uuid: str | None = None
    value: str = ""


class DeleteTag(Message):
    run_id: str
    key: str


class LogBatch(Message):
    run_id: str
    metrics: list[MetricIn] = []
    params: list[KeyValue] = []
    tags: list[KeyValue] = []


class DatasetInputIn(Message):
    dataset: dict[str, Any]
    tags: list[KeyValue] = []


class LogInputs(Message):
    run_id: str
    datasets: list[DatasetInputIn] = []


# --- metrics ----------------------------------------------------------------------------------


class GetHistory(Message):
    metric_key: str
    run_id: str | None = None
    run_uuid: str | None = None
    max_results: int = MAX_HISTORY_PAGE
    page_token: str | None = None


class GetHistoryResponse(Message):
    metrics: list[MetricOut] = []
    next_page_token: str | None = None


class GetHistoryBulkInterval(Message):
    run_ids: list[str]
    metric_key: str
    start_step: int | None = None
    end_step: int | None = None
    max_results: int = 320


class BulkIntervalResponse(Message):
    metrics: list[MetricWithRun] = []


class Empty(Message):
    pass


# --- errors ---------------------------------------------------------------------------------


class MlflowErrorCode(enum.StrEnum):
    """MLflow's `ErrorCode` names this server answers with (`mlflow/protos/databricks.proto`);
    the HTTP status of each is MLflow's own (`mlflow/exceptions.py`)."""

    INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"  # 400
    RESOURCE_ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"  # 400
    UNAUTHENTICATED = "UNAUTHENTICATED"  # 401
    PERMISSION_DENIED = "PERMISSION_DENIED"  # 403
    RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"  # 404
    ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"  # 404
    REQUEST_LIMIT_EXCEEDED = "REQUEST_LIMIT_EXCEEDED"  # 429
    INTERNAL_ERROR = "INTERNAL_ERROR"  # 500
    TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"  # 503


class ErrorBody(Message):
    """MLflow's error shape: the client raises `RestException(error_code)` from it."""

    error_code: MlflowErrorCode
    message: str
