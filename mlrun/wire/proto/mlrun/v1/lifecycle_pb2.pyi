# mypy: ignore-errors
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class DeleteRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class DeleteProjectRequest(_message.Message):
    __slots__ = ("project",)
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    project: str
    def __init__(self, project: _Optional[str] = ...) -> None: ...

class GetPurgeJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class PurgeJob(_message.Message):
    __slots__ = ("job_id", "kind", "target", "project", "state", "phase", "runs", "objects_total", "objects_deleted", "points_removed", "clickhouse_seconds", "ledger_rows_deleted", "attempts", "last_error", "created_at_ms", "not_before_ms", "updated_at_ms", "finished_at_ms")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PROJECT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_DELETED_FIELD_NUMBER: _ClassVar[int]
    POINTS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    CLICKHOUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ROWS_DELETED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    kind: str
    target: str
    project: str
    state: str
    phase: str
    runs: int
    objects_total: int
    objects_deleted: int
    points_removed: int
    clickhouse_seconds: float
    ledger_rows_deleted: int
    attempts: int
    last_error: str
    created_at_ms: int
    not_before_ms: int
    updated_at_ms: int
    finished_at_ms: int
    def __init__(self, job_id: _Optional[str] = ..., kind: _Optional[str] = ..., target: _Optional[str] = ..., project: _Optional[str] = ..., state: _Optional[str] = ..., phase: _Optional[str] = ..., runs: _Optional[int] = ..., objects_total: _Optional[int] = ..., objects_deleted: _Optional[int] = ..., points_removed: _Optional[int] = ..., clickhouse_seconds: _Optional[float] = ..., ledger_rows_deleted: _Optional[int] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., created_at_ms: _Optional[int] = ..., not_before_ms: _Optional[int] = ..., updated_at_ms: _Optional[int] = ..., finished_at_ms: _Optional[int] = ...) -> None: ...
