"""The PostgreSQL side of every write use-case: projects, runs, the idempotency ledger,
cardinality guardrails, params and tags; plus the run -> project lookup of project-scoped API
keys (artifact records are `storage.postgres.artifact_rows`).

Owns: `MetadataStore`, whose methods each make exactly ONE `Postgres.run` call (one worker-thread
hop, one transaction; `prepare_batch` of the common batch first goes through one grouped
autocommit statement, see step 1), and the canonical text form of param values
(`render_param_value`).
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
   The common batch (a batch_id, no params or tags) is claimed with the common batches of
   concurrent requests in ONE autocommit statement (`_CLAIM_KNOWN_GROUP_SQL`, grouped by
   `storage.postgres.statement_groups`: the first claim goes at once, those arriving while it
   is in flight queue and go together next; one worker-thread hop and one round trip per group
   instead of per batch). Per claim, in the transaction's order, it checks the run (404, 409
   `run_finished`), inserts the ledger row only when the run knows every metric name (then the
   transaction would have written nothing else), and otherwise reads the ledger row that was
   there: a different hash -> 409 `batch_conflict`, 'committed' -> "duplicate". The same
   effect and answer as the transaction, which still decides what the statement leaves: new
   names to admit under the limits; a 'pending' row (a retry, or a copy racing its first
   attempt's ledger mark: the transaction's later snapshot sees a mark that landed meanwhile,
   as it did before grouping; deciding "retry" from the statement's snapshot made concurrent
   identical submissions write twice, `test_fifty_concurrent_identical_submissions_...`); a
   ledger row committed by another session after the statement's snapshot; a key repeated
   within one group (after the copy the statement decided: the answers of sequential
   arrivals); and every claim of a statement that failed with a driver error.
   Ledger rows are inserted in (run_id, batch_id) order, the order `mark_batches_committed`
   locks them in. Measured (`python -m bench.claims`, whole-server ingest runs): see
   `statement_groups` and the README, "Where an ingested point's cost goes".
2. The write path makes the points durable, then marks the row (`mark_batches_committed`,
   'pending' -> 'committed', grouped and retried by `pipelines.ledger_marker`). A crash between
   the two leaves 'pending'; the client's resend is written again (the same rows, by the
   versions recorded at the claim, `first_version`) and answered duplicate if ClickHouse held
   all its rows already; never lost, never counted twice.
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
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import psycopg
import psycopg.errors

from mlrun.server import errors
from mlrun.server.ports.run_metadata import BatchOutcome, BatchPreparation, CardinalityLimits
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.run_data import (
    MAX_KEY_BYTES,
    KnownNames,
    check_bytes,
    check_chars,
    dedupe_params,
    dedupe_tags,
    write_run_data,
)
from mlrun.server.storage.postgres.statement_groups import (
    StatementGroups,
    StatementGroupStatistics,
)
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
    Tag,
)
from mlrun.wire.timestamps import iso_utc

MAX_BATCH_ID_BYTES = 256
MAX_RUN_NAME_BYTES = 1024
MAX_PROJECT_NAME_CHARS = 256
MAX_DESCRIPTION_BYTES = 8192

_RUN_ID_HEX_CHARS = 32
# The claims that may queue behind the grouped statement in flight (`StatementGroups`); past
# it a claim is executed alone. A queued claim waits two statement deadlines plus this.
_MAX_QUEUED_CLAIMS = 1024
_CLAIM_WAIT_SLACK_S = 1.0


class MetadataStore:
    """The write use-cases' PostgreSQL side. Every method is one transaction, bounded by
    `timeout_s` (errors.BackendTimeout past it)."""

    def __init__(self, pg: Postgres, *, timeout_s: float = 5.0,
                 max_queued_claims: int = _MAX_QUEUED_CLAIMS) -> None:
        self._pg = pg
        self._timeout_s = timeout_s
        # A queued claim waits for the statement in flight, then for its own group's.
        self._claims: StatementGroups[KnownClaim, ClaimDecision] = StatementGroups(
            self._claim_known_group, wait_timeout_s=2 * timeout_s + _CLAIM_WAIT_SLACK_S,
            max_queued=max_queued_claims)

    def claim_statistics(self) -> StatementGroupStatistics:
        """How the common batch's claims were grouped (statements, claims, largest group)."""
        return self._claims.statistics()

    # --- projects ----------------------------------------------------------------------------

    async def create_project(self, name: str, description: str = "") -> Project:
        """Create a project; 409 `project_exists` (field `name`) when the name is taken."""
        check_chars("name", name, MAX_PROJECT_NAME_CHARS)
        check_bytes("description", description, MAX_DESCRIPTION_BYTES)

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

        return await self._pg.run_statement(select, timeout_s=self._timeout_s)

    # --- run lifecycle -------------------------------------------------------------------------

    async def init_run(
        self, req: InitRun, *, limits: CardinalityLimits
    ) -> tuple[RunCreated, list[IngestWarning]]:
        """Create the run (and its project on first use), or find it again by run_id."""
        run_id = req.run_id or uuid.uuid4().hex[:_RUN_ID_HEX_CHARS]
        name = req.name or run_id
        check_chars("project", req.project, MAX_PROJECT_NAME_CHARS)
        check_bytes("name", name, MAX_RUN_NAME_BYTES)
        params, param_warnings = dedupe_params(
            ((key, value) for key, value in (req.config or {}).items()), field_prefix="config"
        )
        tags = dedupe_tags((req.tags or {}).items())

        def init(conn: psycopg.Connection[Any]) -> tuple[RunCreated, list[IngestWarning]]:
            stored = _select_run(conn, run_id)
            created = False
            if stored is None:
                _refuse_deleted_run_id(conn, run_id)
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
                _, data_warnings = write_run_data(
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
        if status not in get_args(FinalStatus):
            raise errors.InvalidInput("a run cannot be finished as 'running'", field="status")

        def finish(conn: psycopg.Connection[Any]) -> RunState:
            row = conn.execute(
                "UPDATE runs SET status = %s, finished_at = now(), updated_at = now()"
                " WHERE run_id = %s AND status = 'running' RETURNING status",
                (status, run_id),
            ).fetchone()
            if row is not None:
                return RunState(run_id=run_id, status=row[0])
            current = run_status(conn, run_id)
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
            raise _run_finished(run_id, run_status(conn, run_id))

        return await self._pg.run_statement(beat, timeout_s=self._timeout_s)

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
        tags_after_finish: bool = False,
    ) -> BatchPreparation:
        """Claim the batch in the ledger and apply its metadata (see the module docstring)."""
        if batch_id is not None:
            check_bytes("batch_id", batch_id, MAX_BATCH_ID_BYTES)
        names = frozenset(metric_names)
        for metric_name in names:
            check_bytes("metrics", metric_name, MAX_KEY_BYTES)
        param_values, param_warnings = dedupe_params(
            ((p.name, p.value) for p in params), field_prefix="params"
        )
        tag_values = dedupe_tags((t.key, t.value) for t in tags)
        tag_keys = sorted(tag_values)

        def prepare(conn: psycopg.Connection[Any]) -> BatchPreparation:
            try:
                return claim(conn)
            except psycopg.errors.ForeignKeyViolation:
                # The run was deleted while this batch waited for its row (a DELETE that
                # committed first): a metric name or tag for it can no longer be stored.
                raise run_not_found(run_id) from None

        def claim(conn: psycopg.Connection[Any]) -> BatchPreparation:
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
                raise run_not_found(run_id)
            project_id, status, claimed, known_names, known_run_keys, known_project_keys = row
            # Only tags (the same cardinality limits as above) may land on a finished run, and
            # only when the caller asks (the MLflow edge: tagging the best run of a sweep).
            if status != "running" and not (tags_after_finish and points == 0 and not params):
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
            admitted, data_warnings = write_run_data(
                conn,
                run_id=run_id,
                project_id=project_id,
                known=KnownNames(set(known_names), set(known_run_keys), set(known_project_keys)),
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

        if batch_id is not None and not param_values and not tag_values:
            # The common batch (a retry-safe id, no params or tags): claimed with the claims
            # of concurrent batches in one autocommit statement (step 1 of the module
            # docstring); what that statement cannot decide falls through to the transaction.
            decided = await self._claims.submit(KnownClaim(
                run_id, batch_id, payload_hash, seq, points, first_version,
                tuple(sorted(names))))
            if isinstance(decided, errors.MlrunError):
                raise decided
            if decided is not None:
                return decided
        return await self._pg.run(prepare, timeout_s=self._timeout_s)

    async def _claim_known_group(self, claims: Sequence[KnownClaim]) -> list[ClaimDecision]:
        """One statement for a group of claims (`StatementGroups` calls it). A key that comes
        again within the group is left to the transaction, which then runs after the
        statement that decided its first copy: the answers of sequential arrivals. A statement
        that fails as a whole with a driver error leaves every claim to the transaction (one
        bad claim must not fail the others); an outage or timeout fails them all, as it
        would each of them alone."""
        first: dict[tuple[str, str], int] = {}
        for index, claim in enumerate(claims):
            first.setdefault(claim.key, index)
        grouped = sorted(first.values(), key=lambda index: claims[index].key)
        try:
            rows = await self._pg.run_statement(
                lambda conn: _execute_claim_group(conn, [claims[i] for i in grouped]),
                timeout_s=self._timeout_s)
        except errors.BackendError:
            return [None] * len(claims)
        decisions: list[ClaimDecision] = [None] * len(claims)
        for index, row in zip(grouped, rows, strict=True):
            decisions[index] = _decide_claim(claims[index], row)
        return decisions

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

        await self._pg.run_statement(mark, timeout_s=self._timeout_s)

    # --- access checks (mlrun.server.usecases.auth) ------------------------------------------

    async def run_project(self, run_id: str) -> str:
        """The name of the run's project; 404 `run_not_found`."""
        return await self._pg.run_statement(lambda conn: select_run_project(conn, run_id),
                                            timeout_s=self._timeout_s)


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


# The common batch's claims of concurrent requests, grouped (`StatementGroups`): for each item
# (sorted by run and batch id, the ledger's lock order) the run's status, the claim (only for a
# running run that knows every one of the batch's metric names), and the ledger row that was
# there before (this statement's snapshot) when it did not claim.
_CLAIM_KNOWN_GROUP_SQL = """
WITH item AS (
    SELECT * FROM unnest(%(run_ids)s::text[], %(batch_ids)s::text[], %(hashes)s::bytea[],
        %(seqs)s::bigint[], %(points)s::integer[], %(first_versions)s::bigint[],
        %(name_counts)s::integer[]) WITH ORDINALITY
        AS i(run_id, batch_id, hash, seq, points, first_version, name_count, ord)
), known AS (
    SELECT n.ord, count(*) AS n
    FROM unnest(%(name_items)s::bigint[], %(names)s::text[]) AS n(ord, name)
    JOIN item i ON i.ord = n.ord
    JOIN run_metric_names m ON m.run_id = i.run_id AND m.name = n.name
    GROUP BY n.ord
), fit AS (
    SELECT i.*, r.status, coalesce(k.n, 0) = i.name_count AS all_known
    FROM item i LEFT JOIN runs r ON r.run_id = i.run_id LEFT JOIN known k ON k.ord = i.ord
), claim AS (
    INSERT INTO ingest_batches (run_id, batch_id, payload_hash, seq, points, state,
        first_version)
    SELECT run_id, batch_id, hash, seq, points, 'pending', first_version
    FROM fit WHERE status = 'running' AND all_known
    ORDER BY ord
    ON CONFLICT (run_id, batch_id) DO NOTHING
    RETURNING run_id, batch_id
)
SELECT f.status, c.run_id IS NOT NULL, b.payload_hash, b.state
FROM fit f
LEFT JOIN claim c ON c.run_id = f.run_id AND c.batch_id = f.batch_id
LEFT JOIN ingest_batches b ON b.run_id = f.run_id AND b.batch_id = f.batch_id
ORDER BY f.ord
"""


@dataclass(frozen=True, slots=True)
class KnownClaim:
    """The ledger claim of a common batch (a batch_id, no params or tags)."""

    run_id: str
    batch_id: str
    payload_hash: bytes
    seq: int | None
    points: int
    first_version: int
    names: tuple[str, ...]  # distinct and sorted

    @property
    def key(self) -> tuple[str, str]:
        return self.run_id, self.batch_id


# What the grouped statement decided for one claim: the batch's answer, the error it gets
# (raised by `prepare_batch`), or None: undecided, the full transaction decides.
ClaimDecision = BatchPreparation | errors.MlrunError | None


def _execute_claim_group(
    conn: psycopg.Connection[Any], claims: Sequence[KnownClaim]
) -> list[tuple[Any, ...]]:
    """One statement for claims with distinct keys, sorted by key; one row per claim, in order."""
    name_items = [i for i, claim in enumerate(claims, start=1) for _ in claim.names]
    params = {
        "run_ids": [c.run_id for c in claims],
        "batch_ids": [c.batch_id for c in claims],
        "hashes": [c.payload_hash for c in claims],
        "seqs": [c.seq for c in claims],
        "points": [c.points for c in claims],
        "first_versions": [c.first_version for c in claims],
        "name_counts": [len(c.names) for c in claims],
        "name_items": name_items,
        "names": [name for c in claims for name in c.names],
    }
    return conn.execute(_CLAIM_KNOWN_GROUP_SQL, params).fetchall()


def _decide_claim(claim: KnownClaim, row: tuple[Any, ...]) -> ClaimDecision:
    """The answer the full transaction would give (same checks, same order), where one
    statement can tell; None where it leaves the batch to the transaction (new metric names to
    admit under the limits, a ledger row still 'pending', or one committed by someone else
    after this statement's snapshot was taken)."""
    status, claimed, stored_hash, state = row
    if status is None:
        return run_not_found(claim.run_id)
    if status != "running":
        return _run_finished(claim.run_id, status)
    names = frozenset(claim.names)
    if claimed:
        return BatchPreparation(outcome="new", admitted_metric_names=names, warnings=[],
                                first_version=claim.first_version)
    if stored_hash is None:
        return None
    if bytes(stored_hash) != claim.payload_hash:
        return _batch_conflict(claim.batch_id)
    if state == "committed":
        return BatchPreparation(outcome="duplicate", admitted_metric_names=frozenset(),
                                warnings=[], first_version=claim.first_version)
    # 'pending': a retry, or a copy racing its first attempt's ledger mark (the write path
    # marks from its writer, a moment after the points are durable). The transaction decides,
    # as before: its later snapshot sees a mark that landed meanwhile, so such a copy is
    # answered "duplicate" instead of being written again.
    return None


@dataclass(frozen=True, slots=True)
class _RunRow:
    project_id: int
    project_name: str
    name: str
    status: RunStatus


def _select_run(conn: psycopg.Connection[Any], run_id: str) -> _RunRow | None:
    row = conn.execute(
        "SELECT r.project_id, p.name, r.name, r.status FROM runs r"
        " JOIN projects p ON p.id = r.project_id WHERE r.run_id = %s",
        (run_id,),
    ).fetchone()
    return None if row is None else _RunRow(row[0], row[1], row[2], row[3])


def select_run_project(conn: psycopg.Connection[Any], run_id: str) -> str:
    """The name of the run's project; 404 `run_not_found`."""
    row = conn.execute(
        "SELECT p.name FROM runs r JOIN projects p ON p.id = r.project_id WHERE r.run_id = %s",
        (run_id,),
    ).fetchone()
    if row is None:
        raise run_not_found(run_id)
    name: str = row[0]
    return name


def _refuse_deleted_run_id(conn: psycopg.Connection[Any], run_id: str) -> None:
    """409 `run_deleting` while a purge job still holds the run id's tombstone: a new run of
    that id would otherwise meet the old run's points before the purge removed them."""
    if conn.execute("SELECT 1 FROM purge_runs WHERE run_id = %s", (run_id,)).fetchone():
        raise errors.Conflict(
            f"run {run_id!r} was deleted and is still being purged; retry after its purge job"
            " is done", code=ErrorCode.RUN_DELETING, field="run_id")


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


def run_status(conn: psycopg.Connection[Any], run_id: str) -> RunStatus:
    row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    if row is None:
        raise run_not_found(run_id)
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
    if row is None:  # pragma: no cover - the ledger pruning removed it between two statements
        # The row aged out of the ledger window (usecases.lifecycle) just now: outside the
        # window a batch is written again, as documented; its versions are the new ones.
        return "retry", None
    stored_hash, state, stored_first_version = row
    if bytes(stored_hash) != payload_hash:
        raise _batch_conflict(batch_id)
    return ("duplicate" if state == "committed" else "retry"), stored_first_version


# --- pure parts ----------------------------------------------------------------------------------


def run_not_found(run_id: str) -> errors.NotFound:
    return errors.NotFound(f"run {run_id!r} not found",
                           code=ErrorCode.RUN_NOT_FOUND, field="run_id")


def _batch_conflict(batch_id: str) -> errors.Conflict:
    return errors.Conflict(f"batch {batch_id!r} was already received with a different payload",
                           code=ErrorCode.BATCH_CONFLICT, field="batch_id")


def _run_finished(run_id: str, status: str) -> errors.Conflict:
    return errors.Conflict(
        f"run {run_id!r} is already {status}", code=ErrorCode.RUN_FINISHED, field="run_id"
    )

