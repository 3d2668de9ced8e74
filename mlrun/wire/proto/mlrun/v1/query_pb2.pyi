# mypy: ignore-errors
from mlrun.wire.proto.mlrun.v1 import ingest_pb2 as _ingest_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DownsampleMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOWNSAMPLE_METHOD_UNSPECIFIED: _ClassVar[DownsampleMethod]
    DOWNSAMPLE_METHOD_LTTB: _ClassVar[DownsampleMethod]
    DOWNSAMPLE_METHOD_MINMAX: _ClassVar[DownsampleMethod]
    DOWNSAMPLE_METHOD_AVG: _ClassVar[DownsampleMethod]
    DOWNSAMPLE_METHOD_RAW: _ClassVar[DownsampleMethod]

class Alignment(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALIGNMENT_UNSPECIFIED: _ClassVar[Alignment]
    ALIGNMENT_STEP: _ClassVar[Alignment]
    ALIGNMENT_RELATIVE_TIME: _ClassVar[Alignment]
    ALIGNMENT_ABSOLUTE_TIME: _ClassVar[Alignment]
DOWNSAMPLE_METHOD_UNSPECIFIED: DownsampleMethod
DOWNSAMPLE_METHOD_LTTB: DownsampleMethod
DOWNSAMPLE_METHOD_MINMAX: DownsampleMethod
DOWNSAMPLE_METHOD_AVG: DownsampleMethod
DOWNSAMPLE_METHOD_RAW: DownsampleMethod
ALIGNMENT_UNSPECIFIED: Alignment
ALIGNMENT_STEP: Alignment
ALIGNMENT_RELATIVE_TIME: Alignment
ALIGNMENT_ABSOLUTE_TIME: Alignment

class MetricSummary(_message.Message):
    __slots__ = ("name", "last_value", "last_step", "min", "max", "count")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_VALUE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    name: str
    last_value: float
    last_step: int
    min: float
    max: float
    count: int
    def __init__(self, name: _Optional[str] = ..., last_value: _Optional[float] = ..., last_step: _Optional[int] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "project", "name", "status", "created_at_ms", "updated_at_ms", "finished_at_ms", "heartbeat_at_ms", "tags", "params", "artifacts_count", "metrics_summary")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AT_MS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_COUNT_FIELD_NUMBER: _ClassVar[int]
    METRICS_SUMMARY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    project: str
    name: str
    status: _ingest_pb2.RunStatus
    created_at_ms: int
    updated_at_ms: int
    finished_at_ms: int
    heartbeat_at_ms: int
    tags: _containers.ScalarMap[str, str]
    params: _containers.RepeatedCompositeFieldContainer[_ingest_pb2.Param]
    artifacts_count: int
    metrics_summary: _containers.RepeatedCompositeFieldContainer[MetricSummary]
    def __init__(self, run_id: _Optional[str] = ..., project: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[_ingest_pb2.RunStatus, str]] = ..., created_at_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ..., heartbeat_at_ms: _Optional[int] = ..., tags: _Optional[_Mapping[str, str]] = ..., params: _Optional[_Iterable[_Union[_ingest_pb2.Param, _Mapping]]] = ..., artifacts_count: _Optional[int] = ..., metrics_summary: _Optional[_Iterable[_Union[MetricSummary, _Mapping]]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("project", "status", "tags", "params", "q", "created_after_ms", "created_before_ms", "sort", "limit", "cursor", "include_total")
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    CREATED_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    CREATED_BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    project: str
    status: _ingest_pb2.RunStatus
    tags: _containers.RepeatedScalarFieldContainer[str]
    params: _containers.RepeatedScalarFieldContainer[str]
    q: str
    created_after_ms: int
    created_before_ms: int
    sort: str
    limit: int
    cursor: str
    include_total: bool
    def __init__(self, project: _Optional[str] = ..., status: _Optional[_Union[_ingest_pb2.RunStatus, str]] = ..., tags: _Optional[_Iterable[str]] = ..., params: _Optional[_Iterable[str]] = ..., q: _Optional[str] = ..., created_after_ms: _Optional[int] = ..., created_before_ms: _Optional[int] = ..., sort: _Optional[str] = ..., limit: _Optional[int] = ..., cursor: _Optional[str] = ..., include_total: _Optional[bool] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_cursor", "total")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[Run]
    next_cursor: str
    total: int
    def __init__(self, runs: _Optional[_Iterable[_Union[Run, _Mapping]]] = ..., next_cursor: _Optional[str] = ..., total: _Optional[int] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetMetricsRequest(_message.Message):
    __slots__ = ("run_id", "names", "max_points", "start_step", "end_step", "method", "cursor", "system_metrics")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    END_STEP_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    names: _containers.RepeatedScalarFieldContainer[str]
    max_points: int
    start_step: int
    end_step: int
    method: DownsampleMethod
    cursor: str
    system_metrics: bool
    def __init__(self, run_id: _Optional[str] = ..., names: _Optional[_Iterable[str]] = ..., max_points: _Optional[int] = ..., start_step: _Optional[int] = ..., end_step: _Optional[int] = ..., method: _Optional[_Union[DownsampleMethod, str]] = ..., cursor: _Optional[str] = ..., system_metrics: _Optional[bool] = ...) -> None: ...

class MetricSeries(_message.Message):
    __slots__ = ("name", "steps", "values", "timestamps_ms", "total_points", "downsampled", "method", "next_cursor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_POINTS_FIELD_NUMBER: _ClassVar[int]
    DOWNSAMPLED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    timestamps_ms: _containers.RepeatedScalarFieldContainer[int]
    total_points: int
    downsampled: bool
    method: DownsampleMethod
    next_cursor: str
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., timestamps_ms: _Optional[_Iterable[int]] = ..., total_points: _Optional[int] = ..., downsampled: _Optional[bool] = ..., method: _Optional[_Union[DownsampleMethod, str]] = ..., next_cursor: _Optional[str] = ...) -> None: ...

class GetMetricsResponse(_message.Message):
    __slots__ = ("run_id", "series", "available_metrics")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_METRICS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    series: _containers.RepeatedCompositeFieldContainer[MetricSeries]
    available_metrics: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, run_id: _Optional[str] = ..., series: _Optional[_Iterable[_Union[MetricSeries, _Mapping]]] = ..., available_metrics: _Optional[_Iterable[str]] = ...) -> None: ...

class CompareRunsRequest(_message.Message):
    __slots__ = ("run_ids", "metric_names", "alignment", "max_points", "method")
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    METRIC_NAMES_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_POINTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    metric_names: _containers.RepeatedScalarFieldContainer[str]
    alignment: Alignment
    max_points: int
    method: DownsampleMethod
    def __init__(self, run_ids: _Optional[_Iterable[str]] = ..., metric_names: _Optional[_Iterable[str]] = ..., alignment: _Optional[_Union[Alignment, str]] = ..., max_points: _Optional[int] = ..., method: _Optional[_Union[DownsampleMethod, str]] = ...) -> None: ...

class RunSeries(_message.Message):
    __slots__ = ("run_id", "name", "started_at_ms", "series")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    SERIES_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    started_at_ms: int
    series: _containers.RepeatedCompositeFieldContainer[MetricSeries]
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., started_at_ms: _Optional[int] = ..., series: _Optional[_Iterable[_Union[MetricSeries, _Mapping]]] = ...) -> None: ...

class CompareRunsResponse(_message.Message):
    __slots__ = ("runs", "common_metrics", "alignment")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    COMMON_METRICS_FIELD_NUMBER: _ClassVar[int]
    ALIGNMENT_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunSeries]
    common_metrics: _containers.RepeatedScalarFieldContainer[str]
    alignment: Alignment
    def __init__(self, runs: _Optional[_Iterable[_Union[RunSeries, _Mapping]]] = ..., common_metrics: _Optional[_Iterable[str]] = ..., alignment: _Optional[_Union[Alignment, str]] = ...) -> None: ...

class ListArtifactsRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ListArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_ingest_pb2.Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_ingest_pb2.Artifact, _Mapping]]] = ...) -> None: ...

class GetArtifactDownloadUrlRequest(_message.Message):
    __slots__ = ("run_id", "artifact_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    artifact_id: str
    def __init__(self, run_id: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class GetArtifactDownloadUrlResponse(_message.Message):
    __slots__ = ("download_url", "expires_at_ms")
    DOWNLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    download_url: str
    expires_at_ms: int
    def __init__(self, download_url: _Optional[str] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...
