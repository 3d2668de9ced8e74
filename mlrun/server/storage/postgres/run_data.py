"""What a batch or a run's start writes to the run inside the caller's transaction: cardinality
guardrails (metric names, tag keys per run and per project), params (write-once) and tags
(last write wins), and the column limits checked before any SQL runs.

Functions take a psycopg connection inside a transaction (`storage.postgres.metadata` opens
it); the lock order and the guardrail rules are documented in that module. Must not import the
edges, the use-cases, ClickHouse or artifact storage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from mlrun.server import errors
from mlrun.server.ports.run_metadata import CardinalityLimits
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import (
    MAX_VALUE_BYTES,
    IngestWarning,
    ScalarValue,
)

# Column limits of sql/postgres/0001_initial.sql and 0017_long_values.sql, in UTF-8 bytes (the
# CHECKs use octet_length; keys stay below btree's index-entry limit, values are indexed by
# their md5). The wire schema counts characters, which can be more.
MAX_KEY_BYTES = 256


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
class KnownNames:
    """What a snapshot said was already known (only ever grows: nothing here deletes)."""

    metric_names: set[str]
    run_tag_keys: set[str]
    project_tag_keys: set[str]


def write_run_data(
    conn: psycopg.Connection[Any],
    *,
    run_id: str,
    project_id: int,
    known: KnownNames | None,
    metric_names: frozenset[str],
    params: Mapping[str, str],
    param_field_prefix: str,
    tags: Mapping[str, str],
    limits: CardinalityLimits,
) -> tuple[frozenset[str], list[IngestWarning]]:
    """Admit metric names and tag keys under the limits, store tags and params.

    Returns the admitted metric names and the warnings. `known` is what an earlier statement
    of this transaction found already stored (None: look it up here).

    One function on purpose (~150 lines): it is the lock order of the module docstring (run row,
    project row, then names, tag keys, tags, params, each sorted) written top to bottom, and a
    reader checks that order by reading it once; split into steps, the order would live in the
    call sequence of a caller instead."""
    tag_keys = sorted(tags)
    names_sorted = sorted(metric_names)
    if known is None:
        known = lookup_known(conn, run_id, project_id, names_sorted, tag_keys)
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


def lookup_known(
    conn: psycopg.Connection[Any],
    run_id: str,
    project_id: int,
    names: list[str],
    tag_keys: list[str],
) -> KnownNames:
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
    return KnownNames(set(row[0]), set(row[1]), set(row[2]))


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


def _admit(unknown_sorted: list[str], current_count: int, limit: int) -> tuple[list[str], int]:
    """Admit unknown names in order while the total stays within `limit`: (admitted, dropped)."""
    room = max(0, limit - current_count)
    admitted = unknown_sorted[:room]
    return admitted, len(unknown_sorted) - len(admitted)


def dedupe_params(
    items: Iterable[tuple[str, ScalarValue | None]], *, field_prefix: str
) -> tuple[dict[str, str], list[IngestWarning]]:
    """Render and check params; the first value of a name wins (write-once within a batch)."""
    values: dict[str, str] = {}
    warnings: list[IngestWarning] = []
    for key, raw in items:
        value = render_param_value(raw)
        check_bytes(field_prefix, key, MAX_KEY_BYTES)
        check_bytes(f"{field_prefix}.{key}", value, MAX_VALUE_BYTES)
        if key not in values:
            values[key] = value
        elif values[key] != value:
            warnings.append(_param_conflict(key, field_prefix))
    return values, warnings


def dedupe_tags(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Check tags; the last value of a key wins (tags are last-write-wins)."""
    values: dict[str, str] = {}
    for key, value in items:
        check_bytes("tags", key, MAX_KEY_BYTES)
        check_bytes(f"tags.{key}", value, MAX_VALUE_BYTES)
        values[key] = value
    return values


def check_bytes(field: str, value: str, max_bytes: int) -> None:
    if len(value.encode("utf-8", "surrogatepass")) > max_bytes:
        raise errors.InvalidInput(
            f"{field}: longer than {max_bytes} bytes (UTF-8)",
                code=ErrorCode.VALUE_TOO_LONG, field=field
        )


def check_chars(field: str, value: str, max_chars: int) -> None:
    if len(value) > max_chars:
        raise errors.InvalidInput(
            f"{field}: longer than {max_chars} characters",
                code=ErrorCode.VALUE_TOO_LONG, field=field
        )


def render_param_value(value: ScalarValue | None) -> str:
    """The canonical text of a param value: what is stored, compared and shown."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr round-trips through int() / float(), incl. nan and inf
    return value
