"""The JSON payloads of the HTTP API, as msgspec Structs: the one schema of every request and
response, shared by the server, the SDK and the bench suite (and rendered into /openapi.json).

Conventions: timestamps on the wire are epoch milliseconds (`timestamp`, Int64) unless a field
name ends in `_at` (ISO-8601 UTC strings, responses only). Steps are non-negative integers.
Request structs forbid unknown fields, so a typo is a 400 naming the field rather than data
silently ignored. Value limits that msgspec can check (lengths, ranges) are declared here with
`Meta`; limits that depend on config (cardinality) are enforced by the server.

One Encoder and one Decoder per type, built once (`decoder_for`).

Must not import anything from `mlrun.server` or `mlrun.sdk`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from mlrun.wire.error_codes import ErrorCode

T = TypeVar("T")

# Limits (documented in the README's "Limits" table). Names and values are stored in PostgreSQL
# columns whose CHECKs count UTF-8 bytes (sql/postgres/0001_initial.sql, 0017_long_values.sql);
# the character caps here are the cheap first filter and the server checks bytes before
# anything is stored (mlrun.server.storage.postgres.metadata), answering 400 `value_too_long`
# naming the field. Param and tag values take MLflow's own caps (6000 / 8000 characters), so
# whatever an MLflow client may log fits; MAX_VALUE_BYTES holds 8000 characters of any UTF-8.
MAX_NAME_CHARS = 250
MAX_NAME_BYTES = 256
MAX_TAG_VALUE_CHARS = 8000
MAX_PARAM_VALUE_CHARS = 6000
MAX_VALUE_BYTES = 32_000
MAX_POINTS_PER_BATCH = 100_000
MAX_STEP = 2**63 - 1

RunId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
BatchId = Annotated[str, Meta(min_length=1, max_length=128)]  # <= 256 bytes, checked
ProjectName = Annotated[
    str, Meta(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
TagValue = Annotated[str, Meta(max_length=MAX_TAG_VALUE_CHARS)]
ParamValue = Annotated[str, Meta(max_length=MAX_PARAM_VALUE_CHARS)]
Step = Annotated[int, Meta(ge=0, le=MAX_STEP)]
TimestampMs = Annotated[int, Meta(ge=0, le=MAX_STEP)]
RunStatus = Literal["running", "finished", "failed", "killed"]
FinalStatus = Literal["finished", "failed", "killed"]
ScalarValue = str | int | float | bool


class Request(Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of request payloads: unknown fields are refused."""


# --- projects ---------------------------------------------------------------------------------


class CreateProject(Request, frozen=True):
    name: ProjectName
    description: Annotated[str, Meta(max_length=2000)] = ""


class Project(Struct, frozen=True, kw_only=True):
    name: str
    description: str
    created_at: str


class ProjectList(Struct, frozen=True, kw_only=True):
    projects: list[Project]


# --- runs ------------------------------------------------------------------------------------


class InitRun(Request, frozen=True):
    project: ProjectName
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] | None = None
    run_id: RunId | None = None
    tags: dict[Name, TagValue] | None = None
    config: dict[Name, ScalarValue | None] | None = None


class RunCreated(Struct, frozen=True, kw_only=True):
    run_id: str
    project: str
    name: str
    status: RunStatus
    created: bool  # False when run_id already existed (init is idempotent on run_id)


class RunCreatedWithWarnings(Struct, frozen=True, kw_only=True):
    """The answer of POST /api/v1/runs: the run, plus guardrail warnings for its tags/config."""

    run_id: str
    project: str
    name: str
    status: RunStatus
    created: bool
    warnings: list[IngestWarning] = []


class FinishRun(Request, frozen=True):
    status: FinalStatus = "finished"


class RunState(Struct, frozen=True, kw_only=True):
    run_id: str
    status: RunStatus


# --- ingest ----------------------------------------------------------------------------------


class MetricPoint(Request, frozen=True):
    name: Name
    value: float
    step: Step
    timestamp: TimestampMs | None = None


class MetricSeries(Request, frozen=True):
    """Columnar form: one metric name, parallel arrays (cheaper to encode and decode)."""

    name: Name
    steps: list[Step]
    values: list[float]
    timestamps: list[TimestampMs] | None = None


class Param(Request, frozen=True):
    name: Name
    value: ScalarValue


class Tag(Request, frozen=True):
    key: Name
    value: TagValue


class IngestBatch(Request, frozen=True):
    run_id: RunId
    batch_id: BatchId | None = None
    seq: Annotated[int, Meta(ge=0, le=MAX_STEP)] | None = None
    metrics: list[MetricPoint] = []
    series: list[MetricSeries] = []
    params: list[Param] = []
    tags: list[Tag] = []
    system_metrics: list[MetricPoint] = []


class IngestBatchBody(Request, frozen=True):
    """`POST /api/v1/ingest/batch` as sent: like `IngestBatch`, and `params` / `tags` may also be
    objects (`{"lr": 0.01}`, `{"team": "cv"}`), the form every read answers with. `batch()` is
    the canonical `IngestBatch` (lists, in the object's order), so both forms of the same
    content hash alike for idempotency."""

    run_id: RunId
    batch_id: BatchId | None = None
    seq: Annotated[int, Meta(ge=0, le=MAX_STEP)] | None = None
    metrics: list[MetricPoint] = []
    series: list[MetricSeries] = []
    params: list[Param] | dict[Name, ScalarValue] = []
    tags: list[Tag] | dict[Name, TagValue] = []
    system_metrics: list[MetricPoint] = []

    def batch(self) -> IngestBatch:
        params = self.params if isinstance(self.params, list) else [
            Param(name=name, value=value) for name, value in self.params.items()]
        tags = self.tags if isinstance(self.tags, list) else [
            Tag(key=key, value=value) for key, value in self.tags.items()]
        return IngestBatch(run_id=self.run_id, batch_id=self.batch_id, seq=self.seq,
                           metrics=self.metrics, series=self.series, params=params, tags=tags,
                           system_metrics=self.system_metrics)


class IngestWarning(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A structured warning: something was accepted only in part, and why."""

    code: str
    field: str
    message: str
    limit: int | None = None
    dropped: int = 0


class IngestResult(Struct, frozen=True, kw_only=True):
    status: Literal["ok"] = "ok"
    accepted: int
    duplicate: bool
    warnings: list[IngestWarning] = []


class Heartbeat(Struct, frozen=True, kw_only=True):
    run_id: str
    status: RunStatus


# --- errors -----------------------------------------------------------------------------------


# A code is one of the registry's (mlrun.wire.error_codes); typed as plain text so that a
# client built against an older registry still decodes a newer server's errors.
ErrorCodeText = Annotated[str, Meta(
    description="machine-readable code, stable (see the README's Error codes table)",
    extra_json_schema={"enum": [code.value for code in ErrorCode]})]


class ErrorDetail(Struct, frozen=True, kw_only=True):
    code: ErrorCodeText
    message: str
    field: str | None = None


class ErrorBody(Struct, frozen=True, kw_only=True):
    error: ErrorDetail


# --- codecs -----------------------------------------------------------------------------------

json_encoder = msgspec.json.Encoder()


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decoder_for(kind: type[T]) -> msgspec.json.Decoder[T]:
    """The one JSON decoder of a payload type (built on first use, then reused)."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder


def to_builtins(value: Any) -> Any:
    return msgspec.to_builtins(value)
