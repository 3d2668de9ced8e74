"""The export file format (`mlrun export` / `mlrun import`): its records, their encoding, and the
checks that refuse a truncated, tampered or foreign file. Pure: no I/O, no event loop.

A file is gzip-compressed JSON lines, one record per line, each a JSON object whose `kind`
says what it is:

    header                      {"kind": "header", "format": "mlrun-export", ...}
    per run, in this order:
      run                       run fields, project, params, tags, metric names
      points *                  one chunk of one series: columns steps/values/timestamps_ms/versions
      summary *                 the source's min/max of each metric (every value ever written)
      artifact *                one finalized artifact's manifest row
      artifact_bytes *          (only with --artifact-bytes) its bytes, base64, in order
      run_end                   counts and the SHA-256 of the run's lines (run .. last record)
    end                         counts and the SHA-256 of every line before it

Why JSON lines and gzip (not Parquet): the file mixes record kinds of very different shapes,
must be written and read as a stream (a run of 10M points never in memory), and must be
readable by a person with `zcat | head`; gzip and JSON are in Python's standard library, so
the tool needs no new dependency on a server install. Points travel as columns (arrays per
chunk), so JSON costs little over a binary format (see README "Export and import").

Invariants the reader checks (`ExportChecker`), line by line, so that a file is accepted only
whole: the header comes first and names this format and a version this code reads; records
come in the order above, each point chunk's columns have equal lengths and belong to the
current run; `run_end` matches the run's counts and digest; `end` is last and matches the
counts and the digest of the whole file; nothing follows it. The digests are over the exact
line bytes (newline included). A run's digest does not include the header, so exporting an
unchanged run again gives the same digest: that is how import recognises a run it already has.

Must not import anything of the server but the error tree.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Final, Literal

import msgspec

FORMAT_NAME: Final = "mlrun-export"
FORMAT_VERSION: Final = 1

SeriesTable = Literal["metrics", "system_metrics"]


class ExportFileError(ValueError):
    """The file is not a whole, valid export of a version this code reads. The message is one
    line for the operator, with the line number when it is known."""


class Header(msgspec.Struct, tag="header", tag_field="kind", forbid_unknown_fields=True):
    format: str
    format_version: int
    created_at: datetime
    selection: dict[str, str]
    artifact_bytes: bool


class RunFields(msgspec.Struct, tag="run", tag_field="kind"):
    run_id: str
    project: str
    project_description: str
    name: str
    status: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    last_heartbeat_at: datetime | None
    params: dict[str, str]
    tags: dict[str, str]
    metric_names: list[str]


class Points(msgspec.Struct, tag="points", tag_field="kind", array_like=False):
    run_id: str
    table: SeriesTable
    name: str
    steps: list[int]
    values: list[float]
    timestamps_ms: list[int]
    versions: list[int]


class Summary(msgspec.Struct, tag="summary", tag_field="kind"):
    run_id: str
    name: str
    min: float
    max: float


class Artifact(msgspec.Struct, tag="artifact", tag_field="kind"):
    run_id: str
    artifact_id: str
    name: str
    type: str
    size_bytes: int
    sha256: str | None
    mime_type: str
    storage_key: str
    declared_size_bytes: int | None
    created_at: datetime
    finalized_at: datetime


class ArtifactBytes(msgspec.Struct, tag="artifact_bytes", tag_field="kind"):
    run_id: str
    artifact_id: str
    offset: int
    data: bytes


class RunEnd(msgspec.Struct, tag="run_end", tag_field="kind"):
    run_id: str
    points: int
    system_points: int
    artifacts: int
    sha256: str


class End(msgspec.Struct, tag="end", tag_field="kind"):
    runs: int
    points: int
    system_points: int
    lines: int
    sha256: str


Record = Header | RunFields | Points | Summary | Artifact | ArtifactBytes | RunEnd | End

_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(Record)


def encode_line(record: Record) -> bytes:
    """One record as one line (newline included)."""
    return _ENCODER.encode(record) + b"\n"


def new_header(*, created_at: datetime, selection: dict[str, str],
               artifact_bytes: bool) -> Header:
    return Header(format=FORMAT_NAME, format_version=FORMAT_VERSION, created_at=created_at,
                  selection=selection, artifact_bytes=artifact_bytes)


class RunDigest:
    """Counts and the SHA-256 of one run's lines while it is written or read."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.points = 0
        self.system_points = 0
        self.artifacts = 0
        self._hash = hashlib.sha256()

    def add(self, line: bytes, record: Record) -> None:
        self._hash.update(line)
        if isinstance(record, Points):
            if record.table == "metrics":
                self.points += len(record.steps)
            else:
                self.system_points += len(record.steps)
        elif isinstance(record, Artifact):
            self.artifacts += 1

    def end(self) -> RunEnd:
        return RunEnd(run_id=self.run_id, points=self.points, system_points=self.system_points,
                      artifacts=self.artifacts, sha256=self._hash.hexdigest())


class FileDigest:
    """Counts and the SHA-256 of every line of the file so far, for the `end` record."""

    def __init__(self) -> None:
        self.runs = 0
        self.points = 0
        self.system_points = 0
        self.lines = 0
        self._hash = hashlib.sha256()

    def add(self, line: bytes, record: Record) -> None:
        self._hash.update(line)
        self.lines += 1
        if isinstance(record, RunEnd):
            self.runs += 1
            self.points += record.points
            self.system_points += record.system_points

    def end(self) -> End:
        return End(runs=self.runs, points=self.points, system_points=self.system_points,
                   lines=self.lines, sha256=self._hash.hexdigest())


_State = Literal["start", "between_runs", "in_run", "ended"]


class ExportChecker:
    """Decodes and checks a file line by line (see the module docstring); `check(line)` returns
    the record or raises ExportFileError. `finish()` raises unless `end` was seen."""

    def __init__(self) -> None:
        self._state: _State = "start"
        self._line_number = 0
        self._file = FileDigest()
        self._run: RunDigest | None = None
        self._artifact_offsets: dict[str, int] = {}
        self.header: Header | None = None

    @property
    def line_number(self) -> int:
        return self._line_number

    def _fail(self, message: str) -> ExportFileError:
        return ExportFileError(f"line {self._line_number}: {message}")

    def check(self, line: bytes) -> Record:
        self._line_number += 1
        if not line.endswith(b"\n"):
            raise self._fail("the file ends in the middle of a line (truncated)")
        try:
            record = _DECODER.decode(line)
        except msgspec.DecodeError as exc:
            if self._state == "start":
                raise ExportFileError(
                    f"not an MLRun export file (first line is not a {FORMAT_NAME} header: {exc})"
                ) from None
            raise self._fail(f"not a valid record: {exc}") from None
        self._accept(line, record)
        return record

    def _accept(self, line: bytes, record: Record) -> None:
        state = self._state
        if state == "start":
            if not isinstance(record, Header) or record.format != FORMAT_NAME:
                raise ExportFileError(
                    f"not an MLRun export file (the first line is not a {FORMAT_NAME} header)")
            if record.format_version != FORMAT_VERSION:
                raise ExportFileError(
                    f"export format version {record.format_version} is not supported "
                    f"(this mlrun reads version {FORMAT_VERSION})")
            self.header = record
            self._file.add(line, record)
            self._state = "between_runs"
            return
        if state == "ended":
            raise self._fail("data after the end record")
        if isinstance(record, End):
            if state != "between_runs":
                raise self._fail("end record inside a run")
            expected = self._file.end()
            if record != expected:
                raise self._fail(f"the end record does not match the file (expected "
                                 f"{expected.lines} lines, {expected.points} points, "
                                 f"sha256 {expected.sha256[:12]}...)")
            self._state = "ended"
            return
        if isinstance(record, Header):
            raise self._fail("a second header")
        if isinstance(record, RunFields):
            if state != "between_runs":
                raise self._fail("a run record inside another run")
            self._run = RunDigest(record.run_id)
            self._artifact_offsets = {}
            self._run.add(line, record)
            self._file.add(line, record)
            self._state = "in_run"
            return
        run = self._run
        if state != "in_run" or run is None:
            raise self._fail(f"a {type(record).__name__} record outside a run")
        if isinstance(record, RunEnd):
            expected_end = run.end()
            if record != expected_end:
                raise self._fail(f"run {run.run_id}: its lines do not match its run_end record "
                                 "(corrupt or edited)")
            self._file.add(line, record)
            self._run = None
            self._state = "between_runs"
            return
        if record.run_id != run.run_id:
            raise self._fail(f"a record of run {record.run_id} inside run {run.run_id}")
        if isinstance(record, Points):
            count = len(record.steps)
            if not (count == len(record.values) == len(record.timestamps_ms)
                    == len(record.versions)):
                raise self._fail("a points record whose columns differ in length")
        elif isinstance(record, Artifact):
            self._artifact_offsets[record.artifact_id] = 0
        elif isinstance(record, ArtifactBytes):
            offset = self._artifact_offsets.get(record.artifact_id)
            if offset is None or offset != record.offset:
                raise self._fail(f"artifact bytes of {record.artifact_id} out of order")
            self._artifact_offsets[record.artifact_id] = offset + len(record.data)
        run.add(line, record)
        self._file.add(line, record)

    def finish(self) -> End:
        if self._state != "ended":
            raise ExportFileError(
                f"the file ends after line {self._line_number} without its end record "
                "(truncated)")
        return self._file.end()
