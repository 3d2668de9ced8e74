"""The PostgreSQL side of every write use-case: projects, runs, the idempotency ledger,
cardinality guardrails, params and tags; plus the run -> project lookup of project-scoped API
keys and the artifact records (`ArtifactRow`: pending while an upload URL is out, finalized
once `mlrun.server.usecases.artifacts` verified the object).

Owns: `MetadataStore`, whose methods each make exactly ONE `Postgres.run` call (one worker-thread
hop, one transaction), and the canonical text form of param values (`render_param_value`).
It implements the `RunMetadata` port (`mlrun.server.ports.run_metadata`) of the ingest use-case.

Must not import: trio or asyncio, the HTTP/gRPC edges, ClickHouse or artifact storage. It may
import `errors`, `ports` (the records it shares with the use-cases), `wire.schemas` and
`storage.postgres`.

The batch protocol:
1. `prepare_batch` checks the run (404 `run_not_found`, 409 `run_finished`) and claims
   (run_id, batch_id) in the ledger as 'pending' with INSERT .. ON CONFLICT DO NOTHING. A clash
   compares the stored payload hash: different -> 409 `batch_conflict`; same and 'committed' ->
   outcome "duplicate" (nothing else is written); same and 'pending' -> outcome "retry" (an earlier
   attempt did not finish; writing again is harmless, ClickHouse keeps the last write per run,
   metric and step). Concurrent identical submissions serialise on the ledger's primary key: the
   first claims ("new"), the others wait for it to commit and then see its row ("retry" or
   "duplicate"), never an error.
2. The write path makes the points durable, then marks the row (`mark_batches_committed`,
   'pending' -> 'committed', grouped and retried by `pipelines.ledger_marker`). A crash between
   the two leaves 'pending'; the client's resend is then checked against ClickHouse by the
   versions recorded at the claim (`first_version`) and answered duplicate if all its rows are
   there, or written again (the same rows), never lost.
   A batch without batch_id gets no ledger row, outcome "new" and a `not_deduplicated` warning.

Invariants:
- Cardinality is durable and shared by every server process: metric names live in
  run_metric_names, tag keys in run_tags and project_tag_keys. Names already known are always
  admitted. Unknown ones are admitted in sorted order while the run (or project) is under its
  limit; the rest are dropped with one warning per limit {code, field, limit, dropped}. The
  check-then-insert runs under a row lock on the run (and on the project for new project tag
  keys), taken only when something unknown arrived, so the common batch (all names known) takes
  no lock and two processes can never both slip past a limit. The per-run tag limit is applied
  before the per-project one.
- Lock order, the same in every transaction, so concurrent writers cannot deadlock: ledger row,
  run row, project row, then rows of run_metric_names, project_tag_keys, run_tags, run_params,
  each set in sorted key order (rows that `init_run` has just inserted are invisible to others
  until commit, so they add no cycle). Run and project rows are locked FOR NO KEY UPDATE, which
  does not conflict with the FOR KEY SHARE lock a foreign key takes on the parent when a child
  row is inserted; FOR UPDATE would, and measurably deadlocks two concurrent first batches of a
  run (each holds KEY SHARE from its ledger insert and waits for the other's).
- Params are write-once. The same value again is fine; a different value is NOT stored and is
  reported as a `param_conflict` warning (field `params.<name>`, or `config.<name>` at init),
  not a 409: a batch carrying metrics is never refused because of a param clash, and the
  metrics it carries are stored. Within one batch the first value of a name wins.
- Tags are last-write-wins (upsert); within one batch the last value of a key wins.
- Param values are stored in a canonical text form (`render_param_value`): str as is, bool
  'true'/'false', int and float by a repr that round-trips, None 'null'.
- Column limits of the schema are checked before any SQL runs, so an oversized key or value is
  a 400 naming the field (code `value_too_long`), never a constraint violation (500).
- `init_run` is idempotent on run_id: an existing run answers `created=False` (same project
  required, else 409 `run_project_mismatch`); its tags and config are applied like a batch's,
  but only while the run is running (a finished run stores nothing more). A run without a name
  is named after its id. `updated_at` moves when the run's state changes (finish), not on
  heartbeats or batches (which would make every batch contend for the run row).
- Timestamps in answers are ISO-8601 UTC with milliseconds and a `Z` suffix.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from mlrun.server import errors
from mlrun.server.ports.artifact_rows import ArtifactRow
from mlrun.server.ports.run_metadata import BatchOutcome, BatchPreparation, CardinalityLimits
from mlrun.server.storage.postgres.client import Postgres
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import (
    FinalStatus,
    IngestWarning,
    InitRun,
    Param,
    Project,
    RunCreated,
    RunState,
    RunStatus,
    ScalarValue,
    Tag,
)
from mlrun.wire.timestamps import iso_utc

# Column limits of sql/postgres/0001_initial.sql, in UTF-8 bytes (the CHECKs use octet_length,
# kept below btree's index-entry limit). The wire schema counts characters, which can be more.
MAX_KEY_BYTES = 256
MAX_VALUE_BYTES = 2048
MAX_BATCH_ID_BYTES = 256
MAX_RUN_NAME_BYTES = 1024
MAX_PROJECT_NAME_CHARS = 256
MAX_DESCRIPTION_BYTES = 8192

_RUN_ID_HEX_CHARS = 32


def render_param_value(value: ScalarValue | None) -> str:
    """The canonical text of a param value: what is stored, compared and shown."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr round-trips through int() / float(), incl. nan and inf
    return value


class MetadataStore:
    """The write use-cases' PostgreSQL side. Every method is one transaction, bounded by
    `timeout_s` (errors.BackendTimeout past it)."""

    def __init__(self, pg: Postgres, *, timeout_s: float = 5.0) -> None:
        self._pg = pg
        self._timeout_s = timeout_s

    # --- projects ----------------------------------------------------------------------------

    async def create_project(self, name: str, description: str = "") -> Project:
        """Create a project; 409 `project_exists` (field `name`) when the name is taken."""
        _check_chars("name", name, MAX_PROJECT_NAME_CHARS)
        _check_bytes("description", description, MAX_DESCRIPTION_BYTES)

        def create(conn: psycopg.Connection[Any]) -> Project:
            row = conn.execute(
                "INSERT INTO projects (name, description) VALUES (%s, %s)"
                " ON CONFLICT (name) DO NOTHING RETURNING name, description, created_at",
                (name, description),
            ).fetchone()
            if row is None:
                raise errors.Conflict(
                    f"project {name!r} already exists", code=ErrorCode.PROJECT_EXISTS, field="name"
                )
            return Project(name=row[0], description=row[1], created_at=iso_utc(row[2]))

        return await self._pg.run(create, timeout_s=self._timeout_s)

    async def list_projects(self) -> list[Project]:
        def select(conn: psycopg.Connection[Any]) -> list[Project]:
            rows = conn.execute(
                "SELECT name, description, created_at FROM projects ORDER BY name"
            ).fetchall()
            return [Project(name=n, description=d, created_at=iso_utc(c)) for n, d, c in rows]

        return await self._pg.run(select, timeout_s=self._timeout_s)

    # --- run lifecycle -------------------------------------------------------------------------

    async def init_run(
        self, req: InitRun, *, limits: CardinalityLimits
    ) -> tuple[RunCreated, list[IngestWarning]]:
        """Create the run (and its project on first use), or find it again by run_id."""
        run_id = req.run_id or uuid.uuid4().hex[:_RUN_ID_HEX_CHARS]
        name = req.name or run_id
        _check_chars("project", req.project, MAX_PROJECT_NAME_CHARS)
        _check_bytes("name", name, MAX_RUN_NAME_BYTES)
        params, param_warnings = _dedupe_params(
            ((key, value) for key, value in (req.config or {}).items()), field_prefix="config"
        )
        tags = _dedupe_tags((req.tags or {}).items())

        def init(conn: psycopg.Connection[Any]) -> tuple[RunCreated, list[IngestWarning]]:
            stored = _select_run(conn, run_id)
            created = False
            if stored is None:
                project_id = ensure_project(conn, req.project)
                row = conn.execute(
                    "INSERT INTO runs (run_id, project_id, name) VALUES (%s, %s, %s)"
                    " ON CONFLICT (run_id) DO NOTHING RETURNING name, status",
                    (run_id, project_id, name),
                ).fetchone()
                if row is not None:
                    created = True
                    stored = _RunRow(project_id, req.project, row[0], row[1])
                else:
                    # A concurrent init of the same run_id committed first; this statement's
                    # fresh snapshot sees it.
                    stored = _select_run(conn, run_id)
                    if stored is None:  # pragma: no cover - the clashing row was committed
                        raise errors.BackendError(
                            "run vanished during init", backend="postgres", detail=run_id
                        )
            if stored.project_name != req.project:
                raise errors.Conflict(
                    f"run_id {run_id!r} is already used by another run; choose another run_id",
                    code=ErrorCode.RUN_PROJECT_MISMATCH,
                    field="project",
                )
            warnings: list[IngestWarning] = []
            if stored.status == "running" and (params or tags):
                _, data_warnings = _write_run_data(
                    conn,
                    run_id=run_id,
                    project_id=stored.project_id,
                    known=None,
                    metric_names=frozenset(),
                    params=params,
                    param_field_prefix="config",
                    tags=tags,
                    limits=limits,
                )
                warnings = param_warnings + data_warnings
            result = RunCreated(
                run_id=run_id,
                project=stored.project_name,
                name=stored.name,
                status=stored.status,
                created=created,
            )
            return result, warnings

        return await self._pg.run(init, timeout_s=self._timeout_s)

    async def finish_run(self, run_id: str, status: FinalStatus) -> RunState:
        """Leave 'running' for `status`. Finishing again with the same status is a no-op;
        another final status is 409 `run_finished`; an unknown run 404 `run_not_found`."""
        if status not in ("finished", "failed", "killed"):
            raise errors.InvalidInput("a run cannot be finished as 'running'", field="status")

        def finish(conn: psycopg.Connection[Any]) -> RunState:
            row = conn.execute(
                "UPDATE runs SET status = %s, finished_at = now(), updated_at = now()"
                " WHERE run_id = %s AND status = 'running' RETURNING status",
                (status, run_id),
            ).fetchone()
            if row is not None:
                return RunState(run_id=run_id, status=row[0])
            current = _run_status(conn, run_id)
            if current != status:
                raise _run_finished(run_id, current)
            return RunState(run_id=run_id, status=current)

        return await self._pg.run(finish, timeout_s=self._timeout_s)

    async def heartbeat(self, run_id: str) -> RunState:
        """Record that the run's process is alive; 409 `run_finished` once it has finished."""

        def beat(conn: psycopg.Connection[Any]) -> RunState:
            row = conn.execute(
                "UPDATE runs SET last_heartbeat_at = now()"
                " WHERE run_id = %s AND status = 'running' RETURNING status",
                (run_id,),
            ).fetchone()
            if row is not None:
                return RunState(run_id=run_id, status=row[0])
            raise _run_finished(run_id, _run_status(conn, run_id))

        return await self._pg.run(beat, timeout_s=self._timeout_s)

    # --- ingest --------------------------------------------------------------------------------

    async def prepare_batch(
        self,
        *,
        run_id: str,
        batch_id: str | None,
        payload_hash: bytes,
        seq: int | None,
        points: int,
        first_version: int,
        metric_names: Collection[str],
        params: Sequence[Param],
        tags: Sequence[Tag],
        limits: CardinalityLimits,
    ) -> BatchPreparation:
        """Claim the batch in the ledger and apply its metadata (see the module docstring)."""
        if batch_id is not None:
            _check_bytes("batch_id", batch_id, MAX_BATCH_ID_BYTES)
        names = frozenset(metric_names)
        for metric_name in names:
            _check_bytes("metrics", metric_name, MAX_KEY_BYTES)
        param_values, param_warnings = _dedupe_params(
            ((p.name, p.value) for p in params), field_prefix="params"
        )
        tag_values = _dedupe_tags((t.key, t.value) for t in tags)
        tag_keys = sorted(tag_values)

        def prepare(conn: psycopg.Connection[Any]) -> BatchPreparation:
            row = conn.execute(
                _CLAIM_SQL,
                {
                    "run_id": run_id,
                    "batch_id": batch_id,
                    "hash": payload_hash,
                    "seq": seq,
                    "points": points,
                    "first_version": first_version,
                    "names": sorted(names),
                    "tag_keys": tag_keys,
                },
            ).fetchone()
            if row is None:
                raise _run_not_found(run_id)
            project_id, status, claimed, known_names, known_run_keys, known_project_keys = row
            if status != "running":
                raise _run_finished(run_id, status)
            warnings: list[IngestWarning] = []
            # A retry rewrites the rows its first attempt was given: the same versions, so it
            # cannot outrank a later write of the same steps (ledger rows from before versions
            # were kept have none; then the new ones are used).
            versions_from = first_version
            if batch_id is None:
                outcome: BatchOutcome = "new"
                warnings.append(
                    IngestWarning(
                        code=ErrorCode.NOT_DEDUPLICATED,
                        field="batch_id",
                        message="batch has no batch_id: a retry of it would be stored twice",
                    )
                )
            elif claimed:
                outcome = "new"
            else:
                outcome, stored_first_version = _compare_claim(conn, run_id, batch_id,
                                                               payload_hash)
                if stored_first_version is not None:
                    versions_from = stored_first_version
                if outcome == "duplicate":
                    return BatchPreparation(outcome="duplicate", admitted_metric_names=frozenset(),
                                            warnings=[], first_version=first_version)
            admitted, data_warnings = _write_run_data(
                conn,
                run_id=run_id,
                project_id=project_id,
                known=_Known(set(known_names), set(known_run_keys), set(known_project_keys)),
                metric_names=names,
                params=param_values,
                param_field_prefix="params",
                tags=tag_values,
                limits=limits,
            )
            return BatchPreparation(
                outcome=outcome,
                admitted_metric_names=admitted,
                warnings=warnings + param_warnings + data_warnings,
                first_version=versions_from,
            )

        return await self._pg.run(prepare, timeout_s=self._timeout_s)

    async def mark_batch_committed(self, run_id: str, batch_id: str | None) -> None:
        """The batch's points are durable: later arrivals of it are duplicates. No-op for None."""
        await self.mark_batches_committed([(run_id, batch_id)])

    async def mark_batches_committed(self, batches: Iterable[tuple[str, str | None]]) -> None:
        """`mark_batch_committed` for many batches in one statement (for a group commit)."""
        keys = sorted({(run, batch) for run, batch in batches if batch is not None})
        if not keys:
            return
        run_ids = [run for run, _ in keys]
        batch_ids = [batch for _, batch in keys]

        def mark(conn: psycopg.Connection[Any]) -> None:
            # Sorted keys: concurrent group commits lock ledger rows in one order.
            conn.execute(
                "UPDATE ingest_batches AS b SET state = 'committed', committed_at = now()"
                " FROM unnest(%s::text[], %s::text[]) AS k(run_id, batch_id)"
                " WHERE b.run_id = k.run_id AND b.batch_id = k.batch_id"
                " AND b.state = 'pending'",
                (run_ids, batch_ids),
            )

        await self._pg.run(mark, timeout_s=self._timeout_s)

    # --- access checks and artifacts (mlrun.server.usecases.auth, .artifacts) ----------------

    async def run_project(self, run_id: str) -> str:
        """The name of the run's project; 404 `run_not_found`."""

        def select(conn: psycopg.Connection[Any]) -> str:
            row = conn.execute(
                "SELECT p.name FROM runs r JOIN projects p ON p.id = r.project_id"
                " WHERE r.run_id = %s",
                (run_id,),
            ).fetchone()
            if row is None:
                raise _run_not_found(run_id)
            name: str = row[0]
            return name

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def insert_artifact(self, row: ArtifactRow) -> ArtifactRow:
        """Record a pending artifact (an upload URL was handed out); 404 `run_not_found`."""

        def insert(conn: psycopg.Connection[Any]) -> ArtifactRow:
            inserted = conn.execute(
                "INSERT INTO artifacts (artifact_id, run_id, name, type, mime_type, sha256,"
                " storage_key, upload_id, declared_size_bytes, size_bytes, status)"
                " SELECT %s, run_id, %s, %s, %s, %s, %s, %s, %s, 0, 'pending'"
                " FROM runs WHERE run_id = %s"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                (row.artifact_id, row.name, row.type, row.mime_type, row.sha256,
                 row.storage_key, row.upload_id, row.declared_size_bytes, row.run_id),
            ).fetchone()
            if inserted is None:
                raise _run_not_found(row.run_id)
            return _artifact_row(inserted)

        return await self._pg.run(insert, timeout_s=self._timeout_s)

    async def get_artifact(self, run_id: str, artifact_id: str) -> ArtifactRow | None:
        def select(conn: psycopg.Connection[Any]) -> ArtifactRow | None:
            found = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE artifact_id = %s AND run_id = %s",
                (artifact_id, run_id),
            ).fetchone()
            return None if found is None else _artifact_row(found)

        return await self._pg.run(select, timeout_s=self._timeout_s)

    async def finalize_artifact(
        self, run_id: str, artifact_id: str, *, size_bytes: int
    ) -> ArtifactRow | None:
        """pending -> finalized with the verified size. An artifact finalized already is
        returned as it is; None when it does not exist (any more)."""

        def finalize(conn: psycopg.Connection[Any]) -> ArtifactRow | None:
            updated = conn.execute(
                "UPDATE artifacts SET status = 'finalized', finalized_at = now(),"
                " size_bytes = %s, upload_id = NULL"
                " WHERE artifact_id = %s AND run_id = %s AND status = 'pending'"
                f" RETURNING {_ARTIFACT_COLUMNS}",
                (size_bytes, artifact_id, run_id),
            ).fetchone()
            if updated is None:
                updated = conn.execute(
                    f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                    " WHERE artifact_id = %s AND run_id = %s",
                    (artifact_id, run_id),
                ).fetchone()
            return None if updated is None else _artifact_row(updated)

        return await self._pg.run(finalize, timeout_s=self._timeout_s)

    async def delete_pending_artifact(self, run_id: str, artifact_id: str) -> bool:
        """Forget an artifact that was never finalized; False when no pending one exists."""

        def delete(conn: psycopg.Connection[Any]) -> bool:
            deleted = conn.execute(
                "DELETE FROM artifacts WHERE artifact_id = %s AND run_id = %s"
                " AND status = 'pending' RETURNING 1",
                (artifact_id, run_id),
            ).fetchone()
            return deleted is not None

        return await self._pg.run(delete, timeout_s=self._timeout_s)

    async def list_artifacts(self, run_id: str, *, limit: int) -> list[ArtifactRow]:
        """The run's finalized artifacts, oldest first; 404 `run_not_found`."""

        def select(conn: psycopg.Connection[Any]) -> list[ArtifactRow]:
            rows = conn.execute(
                f"SELECT {_ARTIFACT_COLUMNS} FROM artifacts"
                " WHERE run_id = %s AND status = 'finalized'"
                " ORDER BY created_at, artifact_id LIMIT %s",
                (run_id, limit),
            ).fetchall()
            if not rows:
                _run_status(conn, run_id)  # 404 for an unknown run, [] for a known one
            return [_artifact_row(row) for row in rows]

        return await self._pg.run(select, timeout_s=self._timeout_s)


_ARTIFACT_COLUMNS = (
    "artifact_id, run_id, name, type, mime_type, storage_key, sha256, upload_id,"
    " declared_size_bytes, size_bytes, status, created_at, finalized_at"
)


def _artifact_row(row: tuple[Any, ...]) -> ArtifactRow:
    return ArtifactRow(*row)


# --- SQL run in worker threads (every function below takes a connection inside a transaction) --

# The common batch in one statement: the run's state, the ledger claim (only for a running run
# and a batch_id), and which of the batch's metric names and tag keys are already known. Any
# number of concurrent identical claims serialise on the ledger's primary key.
_CLAIM_SQL = """
WITH run AS (
    SELECT run_id, project_id, status FROM runs WHERE run_id = %(run_id)s
), claim AS (
    INSERT INTO ingest_batches (run_id, batch_id, payload_hash, seq, points, state,
        first_version)
    SELECT run_id, %(batch_id)s::text, %(hash)s::bytea, %(seq)s::bigint, %(points)s::integer,
        'pending', %(first_version)s::bigint
    FROM run WHERE status = 'running' AND %(batch_id)s::text IS NOT NULL
    ON CONFLICT (run_id, batch_id) DO NOTHING
    RETURNING 1
)
SELECT run.project_id, run.status, EXISTS (SELECT FROM claim),
    ARRAY(SELECT m.name FROM run_metric_names m
          WHERE m.run_id = run.run_id AND m.name = ANY(%(names)s::text[])),
    ARRAY(SELECT t.key FROM run_tags t
          WHERE t.run_id = run.run_id AND t.key = ANY(%(tag_keys)s::text[])),
    ARRAY(SELECT k.key FROM project_tag_keys k
          WHERE k.project_id = run.project_id AND k.key = ANY(%(tag_keys)s::text[]))
FROM run
"""

# After the run row is locked: the run's counts and known names, seen by a fresh snapshot.
_RUN_RECOUNT_SQL = """
SELECT
    (SELECT count(*) FROM run_metric_names WHERE run_id = %(run_id)s),
    ARRAY(SELECT name FROM run_metric_names
          WHERE run_id = %(run_id)s AND name = ANY(%(names)s::text[])),
    (SELECT count(*) FROM run_tags WHERE run_id = %(run_id)s),
    ARRAY(SELECT key FROM run_tags WHERE run_id = %(run_id)s AND key = ANY(%(tag_keys)s::text[]))
"""

_PROJECT_RECOUNT_SQL = """
SELECT
    (SELECT count(*) FROM project_tag_keys WHERE project_id = %(project_id)s),
    ARRAY(SELECT key FROM project_tag_keys
          WHERE project_id = %(project_id)s AND key = ANY(%(tag_keys)s::text[]))
"""


@dataclass(frozen=True, slots=True)
class _RunRow:
    project_id: int
    project_name: str
    name: str
    status: RunStatus


@dataclass(frozen=True, slots=True)
class _Known:
    """What a snapshot said was already known (only ever grows: nothing here deletes)."""

    metric_names: set[str]
    run_tag_keys: set[str]
    project_tag_keys: set[str]


def _select_run(conn: psycopg.Connection[Any], run_id: str) -> _RunRow | None:
    row = conn.execute(
        "SELECT r.project_id, p.name, r.name, r.status FROM runs r"
        " JOIN projects p ON p.id = r.project_id WHERE r.run_id = %s",
        (run_id,),
    ).fetchone()
    return None if row is None else _RunRow(row[0], row[1], row[2], row[3])


def ensure_project(conn: psycopg.Connection[Any], name: str) -> int:
    """The project's id, creating it on first use (race-safe)."""
    row = conn.execute(
        "INSERT INTO projects (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING id",
        (name,),
    ).fetchone()
    if row is None:
        # A separate statement on purpose: its fresh snapshot sees a project that a concurrent
        # transaction committed while our INSERT waited for it.
        row = conn.execute("SELECT id FROM projects WHERE name = %s", (name,)).fetchone()
        if row is None:  # pragma: no cover - the clashing row was committed
            raise errors.BackendError("project vanished", backend="postgres", detail=name)
    project_id: int = row[0]
    return project_id


def _run_status(conn: psycopg.Connection[Any], run_id: str) -> RunStatus:
    row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    if row is None:
        raise _run_not_found(run_id)
    status: RunStatus = row[0]
    return status


def _compare_claim(
    conn: psycopg.Connection[Any], run_id: str, batch_id: str, payload_hash: bytes
) -> tuple[BatchOutcome, int | None]:
    """The ledger already holds (run_id, batch_id): same payload or not, finished or not? With
    the versions its first attempt was given (None on rows older than that column)."""
    row = conn.execute(
        "SELECT payload_hash, state, first_version FROM ingest_batches"
        " WHERE run_id = %s AND batch_id = %s",
        (run_id, batch_id),
    ).fetchone()
    if row is None:  # pragma: no cover - a ledger row is never deleted while its run is running
        raise errors.BackendError("ledger row vanished", backend="postgres", detail=batch_id)
    stored_hash, state, stored_first_version = row
    if bytes(stored_hash) != payload_hash:
        raise errors.Conflict(
            f"batch {batch_id!r} was already received with a different payload",
            code=ErrorCode.BATCH_CONFLICT,
            field="batch_id",
        )
    return ("duplicate" if state == "committed" else "retry"), stored_first_version


def _write_run_data(
    conn: psycopg.Connection[Any],
    *,
    run_id: str,
    project_id: int,
    known: _Known | None,
    metric_names: frozenset[str],
    params: Mapping[str, str],
    param_field_prefix: str,
    tags: Mapping[str, str],
    limits: CardinalityLimits,
) -> tuple[frozenset[str], list[IngestWarning]]:
    """Admit metric names and tag keys under the limits, store tags and params.

    Returns the admitted metric names and the warnings. `known` is what an earlier statement
    of this transaction found already stored (None: look it up here)."""
    tag_keys = sorted(tags)
    names_sorted = sorted(metric_names)
    if known is None:
        known = _lookup_known(conn, run_id, project_id, names_sorted, tag_keys)
    new_names = metric_names - known.metric_names
    new_run_keys = set(tags) - known.run_tag_keys
    lock_run = bool(new_names or new_run_keys)
    lock_project = bool(new_run_keys - known.project_tag_keys)

    warnings: list[IngestWarning] = []
    admitted_names = metric_names
    insert_names: list[str] = []
    insert_project_keys: list[str] = []
    stored_tag_keys = set(tags)
    if lock_run:
        values = {
            "run_id": run_id,
            "project_id": project_id,
            "names": names_sorted,
            "tag_keys": tag_keys,
        }
        # Pipelined: the locks and the recounts go out in one round trip; the server runs them
        # in order, so the recounts' snapshots are taken after the locks were granted.
        with conn.pipeline():
            conn.execute("SELECT FROM runs WHERE run_id = %s FOR NO KEY UPDATE", (run_id,))
            if lock_project:
                conn.execute(
                    "SELECT FROM projects WHERE id = %s FOR NO KEY UPDATE", (project_id,)
                )
            run_cursor = conn.execute(_RUN_RECOUNT_SQL, values)
            project_cursor = conn.execute(_PROJECT_RECOUNT_SQL, values) if lock_project else None
            run_counts = run_cursor.fetchone()
            project_counts = project_cursor.fetchone() if project_cursor is not None else None
        assert run_counts is not None
        name_count, known_names, run_key_count, known_run_keys = run_counts

        admitted_new_names, dropped_names = _admit(
            sorted(metric_names - set(known_names)), name_count, limits.max_metric_names_per_run
        )
        insert_names = admitted_new_names
        admitted_names = frozenset(known_names) | frozenset(admitted_new_names)
        if dropped_names:
            warnings.append(
                IngestWarning(
                    code=ErrorCode.METRIC_NAMES_LIMIT,
                    field="metrics",
                    message=f"{dropped_names} new metric name(s) dropped: the run has reached"
                    f" its limit of {limits.max_metric_names_per_run} metric names",
                    limit=limits.max_metric_names_per_run,
                    dropped=dropped_names,
                )
            )

        run_admitted_keys, dropped_run_keys = _admit(
            sorted(set(tags) - set(known_run_keys)), run_key_count, limits.max_tag_keys_per_run
        )
        if dropped_run_keys:
            warnings.append(
                IngestWarning(
                    code=ErrorCode.TAG_KEYS_LIMIT,
                    field="tags",
                    message=f"{dropped_run_keys} new tag key(s) dropped: the run has reached"
                    f" its limit of {limits.max_tag_keys_per_run} tag keys",
                    limit=limits.max_tag_keys_per_run,
                    dropped=dropped_run_keys,
                )
            )
        refused_keys: set[str] = set()
        if project_counts is not None:
            project_key_count, known_project_keys = project_counts
            insert_project_keys, dropped_project_keys = _admit(
                sorted(set(run_admitted_keys) - set(known_project_keys)),
                project_key_count,
                limits.max_tags_per_project,
            )
            refused_keys = set(run_admitted_keys) - set(known_project_keys)
            refused_keys -= set(insert_project_keys)
            if dropped_project_keys:
                warnings.append(
                    IngestWarning(
                        code=ErrorCode.PROJECT_TAGS_LIMIT,
                        field="tags",
                        message=f"{dropped_project_keys} new tag key(s) dropped: the project"
                        f" has reached its limit of {limits.max_tags_per_project} tag keys",
                        limit=limits.max_tags_per_project,
                        dropped=dropped_project_keys,
                    )
                )
        stored_tag_keys = (set(known_run_keys) | set(run_admitted_keys)) - refused_keys

    stored_tags = sorted((key, tags[key]) for key in stored_tag_keys)
    param_items = sorted(params.items())
    if not (insert_names or insert_project_keys or stored_tags or param_items):
        return frozenset(admitted_names), warnings

    with conn.pipeline():
        if insert_names:
            conn.execute(
                "INSERT INTO run_metric_names (run_id, name)"
                " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                (run_id, insert_names),
            )
        if insert_project_keys:
            conn.execute(
                "INSERT INTO project_tag_keys (project_id, key)"
                " SELECT %s, unnest(%s::text[]) ON CONFLICT DO NOTHING",
                (project_id, insert_project_keys),
            )
        if stored_tags:
            conn.execute(
                "INSERT INTO run_tags (run_id, key, value)"
                " SELECT %s, k, v FROM unnest(%s::text[], %s::text[]) AS t(k, v)"
                " ON CONFLICT (run_id, key) DO UPDATE SET value = EXCLUDED.value"
                " WHERE run_tags.value IS DISTINCT FROM EXCLUDED.value",
                (run_id, [k for k, _ in stored_tags], [v for _, v in stored_tags]),
            )
        param_cursor = None
        if param_items:
            param_cursor = conn.execute(
                "INSERT INTO run_params (run_id, key, value)"
                " SELECT %s, k, v FROM unnest(%s::text[], %s::text[]) AS p(k, v)"
                " ON CONFLICT DO NOTHING RETURNING key",
                (run_id, [k for k, _ in param_items], [v for _, v in param_items]),
            )
        inserted_params = (
            {key for (key,) in param_cursor.fetchall()} if param_cursor is not None else set()
        )
    present = sorted(set(params) - inserted_params)
    if present:
        warnings.extend(
            _param_conflicts(conn, run_id, {key: params[key] for key in present},
                             param_field_prefix)
        )
    return frozenset(admitted_names), warnings


def _lookup_known(
    conn: psycopg.Connection[Any],
    run_id: str,
    project_id: int,
    names: list[str],
    tag_keys: list[str],
) -> _Known:
    row = conn.execute(
        "SELECT"
        " ARRAY(SELECT name FROM run_metric_names"
        "       WHERE run_id = %(run_id)s AND name = ANY(%(names)s::text[])),"
        " ARRAY(SELECT key FROM run_tags"
        "       WHERE run_id = %(run_id)s AND key = ANY(%(tag_keys)s::text[])),"
        " ARRAY(SELECT key FROM project_tag_keys"
        "       WHERE project_id = %(project_id)s AND key = ANY(%(tag_keys)s::text[]))",
        {"run_id": run_id, "project_id": project_id, "names": names, "tag_keys": tag_keys},
    ).fetchone()
    assert row is not None
    return _Known(set(row[0]), set(row[1]), set(row[2]))


def _param_conflicts(
    conn: psycopg.Connection[Any], run_id: str, values: Mapping[str, str], field_prefix: str
) -> list[IngestWarning]:
    """Params that were already stored: warn about those stored with another value."""
    keys = sorted(values)
    rows = conn.execute(
        "SELECT key, value FROM run_params WHERE run_id = %s AND key = ANY(%s::text[])",
        (run_id, keys),
    ).fetchall()
    stored = dict(rows)
    return [
        _param_conflict(key, field_prefix)
        for key in keys
        if key in stored and stored[key] != values[key]
    ]


def _param_conflict(key: str, field_prefix: str) -> IngestWarning:
    return IngestWarning(
        code=ErrorCode.PARAM_CONFLICT,
        field=f"{field_prefix}.{key}",
        message=f"param {key!r} already has a different value; params are write-once, so the"
        " stored value is kept",
    )


# --- pure parts ----------------------------------------------------------------------------------


def _admit(unknown_sorted: list[str], current_count: int, limit: int) -> tuple[list[str], int]:
    """Admit unknown names in order while the total stays within `limit`: (admitted, dropped)."""
    room = max(0, limit - current_count)
    admitted = unknown_sorted[:room]
    return admitted, len(unknown_sorted) - len(admitted)


def _dedupe_params(
    items: Iterable[tuple[str, ScalarValue | None]], *, field_prefix: str
) -> tuple[dict[str, str], list[IngestWarning]]:
    """Render and check params; the first value of a name wins (write-once within a batch)."""
    values: dict[str, str] = {}
    warnings: list[IngestWarning] = []
    for key, raw in items:
        value = render_param_value(raw)
        _check_bytes(field_prefix, key, MAX_KEY_BYTES)
        _check_bytes(f"{field_prefix}.{key}", value, MAX_VALUE_BYTES)
        if key not in values:
            values[key] = value
        elif values[key] != value:
            warnings.append(_param_conflict(key, field_prefix))
    return values, warnings


def _dedupe_tags(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Check tags; the last value of a key wins (tags are last-write-wins)."""
    values: dict[str, str] = {}
    for key, value in items:
        _check_bytes("tags", key, MAX_KEY_BYTES)
        _check_bytes(f"tags.{key}", value, MAX_VALUE_BYTES)
        values[key] = value
    return values


def _check_bytes(field: str, value: str, max_bytes: int) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise errors.InvalidInput(
            f"{field}: longer than {max_bytes} bytes (UTF-8)",
                code=ErrorCode.VALUE_TOO_LONG, field=field
        )


def _check_chars(field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise errors.InvalidInput(
            f"{field}: longer than {max_chars} characters",
                code=ErrorCode.VALUE_TOO_LONG, field=field
        )


def _run_not_found(run_id: str) -> errors.NotFound:
    return errors.NotFound(f"run {run_id!r} not found",
                           code=ErrorCode.RUN_NOT_FOUND, field="run_id")


def _run_finished(run_id: str, status: str) -> errors.Conflict:
    return errors.Conflict(
        f"run {run_id!r} is already {status}", code=ErrorCode.RUN_FINISHED, field="run_id"
    )

