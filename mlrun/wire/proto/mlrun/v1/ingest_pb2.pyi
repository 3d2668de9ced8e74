# mypy: ignore-errors
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_RUNNING: _ClassVar[RunStatus]
    RUN_STATUS_FINISHED: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]
    RUN_STATUS_KILLED: _ClassVar[RunStatus]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_RUNNING: RunStatus
RUN_STATUS_FINISHED: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_STATUS_KILLED: RunStatus

class MetricPoint(_message.Message):
    __slots__ = ("name", "value", "step", "timestamp_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    step: int
    timestamp_ms: int
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ..., step: _Optional[int] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class MetricColumn(_message.Message):
    __slots__ = ("name", "steps", "values", "timestamps_ms")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_MS_FIELD_NUMBER: _ClassVar[int]
    name: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    timestamps_ms: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., timestamps_ms: _Optional[_Iterable[int]] = ...) -> None: ...

class Param(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: _struct_pb2.Value
    def __init__(self, name: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...

class Tag(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Warning(_message.Message):
    __slots__ = ("code", "field", "limit", "dropped", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    field: str
    limit: int
    dropped: int
    message: str
    def __init__(self, code: _Optional[str] = ..., field: _Optional[str] = ..., limit: _Optional[int] = ..., dropped: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InitRunRequest(_message.Message):
    __slots__ = ("project", "name", "run_id", "tags", "config")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    project: str
    name: str
    run_id: str
    tags: _containers.ScalarMap[str, str]
    config: _containers.MessageMap[str, _struct_pb2.Value]
    def __init__(self, project: _Optional[str] = ..., name: _Optional[str] = ..., run_id: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., config: _Optional[_Mapping[str, _struct_pb2.Value]] = ...) -> None: ...

class InitRunResponse(_message.Message):
    __slots__ = ("run_id", "project", "status")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    project: str
    status: RunStatus
    def __init__(self, run_id: _Optional[str] = ..., project: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ...) -> None: ...

class LogBatchRequest(_message.Message):
    __slots__ = ("run_id", "batch_id", "seq", "metrics", "params", "tags", "system_metrics", "metric_columns", "system_metric_columns")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_METRICS_FIELD_NUMBER: _ClassVar[int]
    METRIC_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_METRIC_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    batch_id: str
    seq: int
    metrics: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    params: _containers.RepeatedCompositeFieldContainer[Param]
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    system_metrics: _containers.RepeatedCompositeFieldContainer[MetricPoint]
    metric_columns: _containers.RepeatedCompositeFieldContainer[MetricColumn]
    system_metric_columns: _containers.RepeatedCompositeFieldContainer[MetricColumn]
    def __init__(self, run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., seq: _Optional[int] = ..., metrics: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ..., tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ..., system_metrics: _Optional[_Iterable[_Union[MetricPoint, _Mapping]]] = ..., metric_columns: _Optional[_Iterable[_Union[MetricColumn, _Mapping]]] = ..., system_metric_columns: _Optional[_Iterable[_Union[MetricColumn, _Mapping]]] = ...) -> None: ...

class LogBatchResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "warnings")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: bool
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ...) -> None: ...

class LogParamsRequest(_message.Message):
    __slots__ = ("run_id", "params", "batch_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    params: _containers.RepeatedCompositeFieldContainer[Param]
    batch_id: str
    def __init__(self, run_id: _Optional[str] = ..., params: _Optional[_Iterable[_Union[Param, _Mapping]]] = ..., batch_id: _Optional[str] = ...) -> None: ...

class LogParamsResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "warnings")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: bool
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ...) -> None: ...

class LogTagsRequest(_message.Message):
    __slots__ = ("run_id", "tags", "batch_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    tags: _containers.RepeatedCompositeFieldContainer[Tag]
    batch_id: str
    def __init__(self, run_id: _Optional[str] = ..., tags: _Optional[_Iterable[_Union[Tag, _Mapping]]] = ..., batch_id: _Optional[str] = ...) -> None: ...

class LogTagsResponse(_message.Message):
    __slots__ = ("accepted", "duplicate", "warnings")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    duplicate: bool
    warnings: _containers.RepeatedCompositeFieldContainer[Warning]
    def __init__(self, accepted: _Optional[int] = ..., duplicate: _Optional[bool] = ..., warnings: _Optional[_Iterable[_Union[Warning, _Mapping]]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("status", "server_time_ms")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    status: RunStatus
    server_time_ms: int
    def __init__(self, status: _Optional[_Union[RunStatus, str]] = ..., server_time_ms: _Optional[int] = ...) -> None: ...

class FinishRunRequest(_message.Message):
    __slots__ = ("run_id", "status")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: RunStatus
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ...) -> None: ...

class FinishRunResponse(_message.Message):
    __slots__ = ("run_id", "status")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    status: RunStatus
    def __init__(self, run_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("artifact_id", "run_id", "name", "type", "size_bytes", "sha256", "mime_type", "created_at_ms")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    run_id: str
    name: str
    type: str
    size_bytes: int
    sha256: str
    mime_type: str
    created_at_ms: int
    def __init__(self, artifact_id: _Optional[str] = ..., run_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., mime_type: _Optional[str] = ..., created_at_ms: _Optional[int] = ...) -> None: ...

class CreateArtifactUploadRequest(_message.Message):
    __slots__ = ("run_id", "name", "type", "size_bytes", "sha256", "mime_type")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    name: str
    type: str
    size_bytes: int
    sha256: str
    mime_type: str
    def __init__(self, run_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., mime_type: _Optional[str] = ...) -> None: ...

class UploadPart(_message.Message):
    __slots__ = ("part_number", "url")
    PART_NUMBER_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    part_number: int
    url: str
    def __init__(self, part_number: _Optional[int] = ..., url: _Optional[str] = ...) -> None: ...

class MultipartUpload(_message.Message):
    __slots__ = ("upload_id", "part_size_bytes", "parts", "complete_url", "abort_url")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PART_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_URL_FIELD_NUMBER: _ClassVar[int]
    ABORT_URL_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    part_size_bytes: int
    parts: _containers.RepeatedCompositeFieldContainer[UploadPart]
    complete_url: str
    abort_url: str
    def __init__(self, upload_id: _Optional[str] = ..., part_size_bytes: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[UploadPart, _Mapping]]] = ..., complete_url: _Optional[str] = ..., abort_url: _Optional[str] = ...) -> None: ...

class CreateArtifactUploadResponse(_message.Message):
    __slots__ = ("artifact_id", "upload_url", "expires_at_ms", "required_headers", "multipart")
    class RequiredHeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_HEADERS_FIELD_NUMBER: _ClassVar[int]
    MULTIPART_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    upload_url: str
    expires_at_ms: int
    required_headers: _containers.ScalarMap[str, str]
    multipart: MultipartUpload
    def __init__(self, artifact_id: _Optional[str] = ..., upload_url: _Optional[str] = ..., expires_at_ms: _Optional[int] = ..., required_headers: _Optional[_Mapping[str, str]] = ..., multipart: _Optional[_Union[MultipartUpload, _Mapping]] = ...) -> None: ...

class CompletedPart(_message.Message):
    __slots__ = ("part_number", "etag")
    PART_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    part_number: int
    etag: str
    def __init__(self, part_number: _Optional[int] = ..., etag: _Optional[str] = ...) -> None: ...

class FinalizeArtifactUploadRequest(_message.Message):
    __slots__ = ("run_id", "artifact_id", "parts")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    artifact_id: str
    parts: _containers.RepeatedCompositeFieldContainer[CompletedPart]
    def __init__(self, run_id: _Optional[str] = ..., artifact_id: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[CompletedPart, _Mapping]]] = ...) -> None: ...

class FinalizeArtifactUploadResponse(_message.Message):
    __slots__ = ("artifact",)
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    artifact: Artifact
    def __init__(self, artifact: _Optional[_Union[Artifact, _Mapping]] = ...) -> None: ...
