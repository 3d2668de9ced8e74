"""`PostgresKeyDirectory` and `KeyManagement` against real PostgreSQL: the Debian 15 cluster and
the embedded pgserver (16), a fresh migrated database per test. No mocks."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import psycopg
import pytest

from mlrun.server import errors
from mlrun.server.ports.keys import NewKeyRecord, Principal
from mlrun.server.storage.postgres.client import Postgres
from mlrun.server.storage.postgres.keys import PostgresKeyDirectory
from mlrun.server.usecases.auth import Authenticator, key_digest
from mlrun.server.usecases.keys import KeyManagement
from mlrun.wire.keys import CreateKey

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres_engines("debian", "embedded")]

ADMIN = Principal("bootstrap", frozenset({"admin"}))
TEST_DEADLINE_S = 60


def record(key_id: str, raw: str, *, project: str | None = None,
           expires_in_s: int | None = None, scopes: tuple[str, ...] = ("read",)) -> NewKeyRecord:
    return NewKeyRecord(key_id=key_id, name=f"key {key_id}", display_prefix=raw[:12],
                        digest=key_digest(raw), scopes=scopes, project=project,
                        expires_in_s=expires_in_s)


async def sql(pg: Postgres, query: str, params: Any = ()) -> list[tuple[Any, ...]]:
    def run(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []

    return await pg.run(run, timeout_s=10)


async def test_insert_load_list_revoke(pg: Postgres) -> None:
    directory = PostgresKeyDirectory(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        stored = await directory.insert(record("k1", "mlrun_one", scopes=("read", "write")),
                                        max_usable=10)
        assert stored.expires_at_s is None
        assert (stored.info.key_id, stored.info.status, stored.info.scopes) == (
            "k1", "active", ["read", "write"])
        assert stored.info.created_at.endswith("Z") and stored.info.revoked_at is None
        # A key is scoped to a project that exists; a typo does not create one.
        with pytest.raises(errors.NotFound) as unknown:
            await directory.insert(record("k2", "mlrun_two", project="proj-a",
                                          expires_in_s=3600), max_usable=10)
        assert (unknown.value.code, unknown.value.field) == ("project_not_found", "project")
        assert await sql(pg, "SELECT name FROM projects") == []
        await sql(pg, "INSERT INTO projects (name) VALUES ('proj-a')")
        scoped = await directory.insert(record("k2", "mlrun_two", project="proj-a",
                                               expires_in_s=3600), max_usable=10)
        assert scoped.info.project == "proj-a" and scoped.expires_at_s is not None

        loaded = {k.principal.key_id: k for k in await directory.load_usable()}
        assert set(loaded) == {"k1", "k2"}
        assert loaded["k1"].digest == key_digest("mlrun_one")
        assert loaded["k2"].principal == Principal("k2", frozenset({"read"}), "proj-a")
        assert loaded["k2"].expires_at_s == scoped.expires_at_s

        assert [k.key_id for k in await directory.list_keys(project=None)] == ["k2", "k1"]
        assert [k.key_id for k in await directory.list_keys(project="proj-a")] == ["k2"]
        assert await directory.list_keys(project="proj-b") == []

        with pytest.raises(errors.NotFound):
            await directory.revoke("k1", project="proj-a")  # outside the caller's project
        revoked = await directory.revoke("k1", project=None)
        assert revoked.status == "revoked" and revoked.revoked_at is not None
        again = await directory.revoke("k1", project=None)  # idempotent, same timestamp
        assert again.revoked_at == revoked.revoked_at
        with pytest.raises(errors.NotFound):
            await directory.revoke("nope", project=None)
        assert [k.principal.key_id for k in await directory.load_usable()] == ["k2"]

        rows = await sql(pg, "SELECT key_hash FROM api_keys ORDER BY key_id")
        assert [bytes(r[0]) for r in rows] == [key_digest("mlrun_one"), key_digest("mlrun_two")]


async def test_expired_keys_stay_loaded_for_a_while_and_list_as_expired(pg: Postgres) -> None:
    directory = PostgresKeyDirectory(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        await directory.insert(record("old", "mlrun_old", expires_in_s=60), max_usable=10)
        await sql(pg, "UPDATE api_keys SET expires_at = now() - interval '1 hour'")
        [loaded] = await directory.load_usable()  # still known: its holder learns key_expired
        assert loaded.expires_at_s is not None
        [listed] = await directory.list_keys(project=None)
        assert listed.status == "expired"
        await sql(pg, "UPDATE api_keys SET expires_at = now() - interval '2 days'")
        assert await directory.load_usable() == []


async def test_the_cap_on_usable_keys_is_exact_under_concurrency(pg: Postgres) -> None:
    directory = PostgresKeyDirectory(pg)
    outcomes: list[str] = []

    async def attempt(n: int) -> None:
        try:
            await directory.insert(record(f"k{n}", f"mlrun_{n}"), max_usable=5)
            outcomes.append("ok")
        except errors.Conflict as exc:
            outcomes.append(exc.code)

    with anyio.fail_after(TEST_DEADLINE_S):
        async with anyio.create_task_group() as tg:
            for n in range(12):
                tg.start_soon(attempt, n)
        assert sorted(outcomes) == ["ok"] * 5 + ["too_many_keys"] * 7
        # A revoked key frees its slot.
        await directory.revoke((await directory.list_keys(project=None))[0].key_id, project=None)
        await directory.insert(record("again", "mlrun_again"), max_usable=5)


async def test_last_used_only_moves_forward(pg: Postgres) -> None:
    directory = PostgresKeyDirectory(pg)
    with anyio.fail_after(TEST_DEADLINE_S):
        await directory.insert(record("k", "mlrun_k"), max_usable=10)
        await directory.record_last_used({"k": 1_800_000_000.0, "unknown": 1.0})
        await directory.record_last_used({"k": 1_700_000_000.0})  # older: ignored
        [listed] = await directory.list_keys(project=None)
        assert listed.last_used_at == "2027-01-15T08:00:00.000Z"


async def test_key_management_rules(pg: Postgres) -> None:
    directory = PostgresKeyDirectory(pg)
    auth = Authenticator(bootstrap_key=None, disabled=False)
    keys = KeyManagement(directory, auth)
    with anyio.fail_after(TEST_DEADLINE_S):
        created = await keys.create(ADMIN, CreateKey(name="ci", scopes=["write", "read", "write"]))
        assert created.scopes == ["read", "write"]
        assert auth.authenticate({"x-api-key": created.key}).key_id == created.key_id
        encoded = msgspec.json.encode(await keys.list_keys(ADMIN))
        assert created.key.encode() not in encoded and created.display_prefix.encode() in encoded

        team_admin = Principal("t", frozenset({"admin"}), "proj-a")
        await sql(pg, "INSERT INTO projects (name) VALUES ('proj-a')")  # a key's project exists
        scoped = await keys.create(team_admin, CreateKey(name="a", scopes=["read"]))
        assert scoped.project == "proj-a"  # defaults to the admin's own project
        with pytest.raises(errors.PermissionDenied):
            await keys.create(team_admin, CreateKey(name="b", scopes=["read"], project="proj-b"))
        writer = Principal("w", frozenset({"write"}))
        for call in (keys.list_keys(writer), keys.revoke(writer, scoped.key_id)):
            with pytest.raises(errors.PermissionDenied):
                await call
        assert [k.key_id for k in await keys.list_keys(team_admin)] == [scoped.key_id]
        with pytest.raises(errors.NotFound):
            await keys.revoke(team_admin, created.key_id)

        await keys.revoke(ADMIN, created.key_id)
        with pytest.raises(errors.Unauthenticated):
            auth.authenticate({"x-api-key": created.key})

    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "x", "scopes": ["root"]}, CreateKey)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "x", "scopes": []}, CreateKey)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"name": "x", "scopes": ["read"], "expires_in_s": 0}, CreateKey)


async def test_the_schema_refuses_unknown_scopes(pg: Postgres) -> None:
    with anyio.fail_after(TEST_DEADLINE_S), pytest.raises(errors.BackendError):
        await sql(pg, "INSERT INTO api_keys (key_id, display_prefix, key_hash, scopes)"
                      " VALUES ('x', 'p', '\\x00', '{root}')")
