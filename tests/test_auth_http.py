"""The auth matrix over HTTP, end to end: real `mlrun serve` processes on real PostgreSQL,
ClickHouse and S3 (rclone).

Every row of the matrix is a real request with a real key minted through `POST /api/v1/keys`;
revocation is checked on a second server process sharing the PostgreSQL database; and every
response body, header and server log line is searched for every raw key afterwards.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(180)

# How long the second server may take to see a change made through the first: the key view is
# reloaded every 2 s, so this leaves ample slack without letting a broken reload pass.
PROPAGATION_DEADLINE_S = 8.0


@dataclass
class Recorder:
    """An httpx client that keeps every response it got, to search them for keys later."""

    base_url: str
    seen: list[tuple[str, str]] = field(default_factory=list)  # (request, headers + body)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=15)

    def call(self, method: str, path: str, key: str | None = None, *, header: str = "bearer",
             json: Any = None, record: bool = True) -> httpx.Response:
        headers: dict[str, str] = {}
        if key is not None:
            if header == "bearer":
                headers["Authorization"] = f"Bearer {key}"
            else:
                headers["X-API-Key"] = key
        response = self.http.request(method, path, headers=headers, json=json)
        if record:
            self.seen.append((f"{method} {path}",
                              str(dict(response.headers)) + response.text))
        return response

    def close(self) -> None:
        self.http.close()


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def mint(client: Recorder, **payload: Any) -> dict[str, Any]:
    """Create a key with the bootstrap admin key; the answer is not recorded (it is the one
    place a key may appear). A key's project must exist first."""
    if payload.get("project"):
        client.call("POST", "/api/v1/projects", TEST_API_KEY, json={"name": payload["project"]},
                    record=False)
    response = client.call("POST", "/api/v1/keys", TEST_API_KEY, json=payload, record=False)
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    created: dict[str, Any] = response.json()
    assert created["key"].startswith("mlrun_") and len(created["key"]) >= 6 + 43
    assert created["key"].startswith(created["display_prefix"])
    return created


def new_run(client: Recorder, key: str, project: str) -> str:
    response = client.call("POST", "/api/v1/runs", key, json={"project": project})
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def batch(run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "batch_id": uuid.uuid4().hex,
            "metrics": [{"name": "loss", "value": 0.5, "step": 1}]}


def test_auth_matrix_over_http(server: ServerProcess, server_env: dict[str, str]) -> None:
    client = Recorder(server.base_url)
    try:
        reader = mint(client, name="reader", scopes=["read"])
        writer = mint(client, name="writer", scopes=["write"])
        writer_a = mint(client, name="team a", scopes=["read", "write"], project="proj-a")
        admin = mint(client, name="ops", scopes=["admin"])
        admin_a = mint(client, name="team a admin", scopes=["admin"], project="proj-a")
        revoked = mint(client, name="gone", scopes=["admin"])
        expiring = mint(client, name="short", scopes=["admin"], expires_in_s=1)
        unknown_key = "mlrun_" + "x" * 43

        run_b = new_run(client, TEST_API_KEY, "proj-b")
        run_a = new_run(client, writer_a["key"], "proj-a")

        response = client.call("DELETE", f"/api/v1/keys/{revoked['key_id']}", admin["key"])
        assert response.status_code == 200 and response.json()["status"] == "revoked"
        # Expiry is a wall-clock deadline: wait it out once, then it must hold.
        time.sleep(1.5)

        artifact = {"name": "model.bin", "size_bytes": 3}
        matrix: list[tuple[str, str | None, str, str, Any, int, str | None]] = [
            # (case, key, method, path, body, status, error code)
            ("no key", None, "GET", "/api/v1/projects", None, 401, "missing_credentials"),
            ("no key, write route", None, "POST", "/api/v1/runs", {"project": "p"}, 401,
             "missing_credentials"),
            ("unknown key", unknown_key, "GET", "/api/v1/projects", None, 401,
             "invalid_credentials"),
            ("revoked key", revoked["key"], "GET", "/api/v1/keys", None, 401,
             "invalid_credentials"),
            ("expired key", expiring["key"], "GET", "/api/v1/keys", None, 401, "key_expired"),
            ("read key reading", reader["key"], "GET", "/api/v1/projects", None, 200, None),
            ("read key writing", reader["key"], "POST", "/api/v1/runs", {"project": "p"}, 403,
             "missing_scope"),
            ("read key logging", reader["key"], "POST", "/api/v1/ingest/batch", batch(run_b),
             403, "missing_scope"),
            ("read key uploading", reader["key"], "POST", f"/api/v1/runs/{run_b}/artifacts",
             artifact, 403, "missing_scope"),
            ("read key listing artifacts", reader["key"], "GET",
             f"/api/v1/runs/{run_b}/artifacts", None, 200, None),
            ("write key writing", writer["key"], "POST", "/api/v1/ingest/batch", batch(run_b),
             200, None),
            ("write key reading", writer["key"], "GET", "/api/v1/projects", None, 403,
             "missing_scope"),
            ("write key managing keys", writer["key"], "GET", "/api/v1/keys", None, 403,
             "missing_scope"),
            ("project A key in project A", writer_a["key"], "POST", "/api/v1/ingest/batch",
             batch(run_a), 200, None),
            ("project A key inits in B", writer_a["key"], "POST", "/api/v1/runs",
             {"project": "proj-b"}, 403, "wrong_project"),
            ("project A key logs to B", writer_a["key"], "POST", "/api/v1/ingest/batch",
             batch(run_b), 404, "run_not_found"),
            ("project A key finishes B", writer_a["key"], "POST", f"/api/v1/runs/{run_b}/finish",
             {"status": "finished"}, 404, "run_not_found"),
            ("project A key heartbeats B", writer_a["key"], "POST",
             f"/api/v1/runs/{run_b}/heartbeat", None, 404, "run_not_found"),
            ("project A key uploads to B", writer_a["key"], "POST",
             f"/api/v1/runs/{run_b}/artifacts", artifact, 404, "run_not_found"),
            ("project A key lists B's artifacts", writer_a["key"], "GET",
             f"/api/v1/runs/{run_b}/artifacts", None, 404, "run_not_found"),
            ("project A key creates project B", writer_a["key"], "POST", "/api/v1/projects",
             {"name": "proj-b2"}, 403, "wrong_project"),
            ("project A key, unknown run", writer_a["key"], "POST",
             "/api/v1/runs/no-such-run/heartbeat", None, 404, "run_not_found"),
            ("admin key lists keys", admin["key"], "GET", "/api/v1/keys", None, 200, None),
            ("admin key writes anywhere", admin["key"], "POST", "/api/v1/ingest/batch",
             batch(run_a), 200, None),
            ("project admin mints a global key", admin_a["key"], "POST", "/api/v1/keys",
             {"name": "x", "scopes": ["read"], "project": "proj-b"}, 403, "wrong_project"),
            ("project admin revokes a key of another project", admin_a["key"], "DELETE",
             f"/api/v1/keys/{writer['key_id']}", None, 404, "key_not_found"),
            ("admin revokes an unknown key", admin["key"], "DELETE", "/api/v1/keys/key_nope",
             None, 404, "key_not_found"),
            ("bootstrap key lists keys", TEST_API_KEY, "GET", "/api/v1/keys", None, 200, None),
            ("bootstrap key writes", TEST_API_KEY, "POST", "/api/v1/ingest/batch", batch(run_b),
             200, None),
        ]
        failures = []
        for case, key, method, path, body, status, code in matrix:
            for header in ("bearer", "x-api-key"):
                if key is None and header == "x-api-key":
                    continue
                response = client.call(method, path, key, header=header, json=body)
                got_code = error_code(response) if response.status_code >= 400 else None
                if (response.status_code, got_code) != (status, code):
                    failures.append(f"{case} [{header}]: expected {status} {code}, got "
                                    f"{response.status_code} {response.text[:200]}")
        assert not failures, "\n".join(failures)

        malformed = client.http.get("/api/v1/projects",
                                    headers={"Authorization": f"Basic {reader['key']}"})
        assert malformed.status_code == 401
        assert error_code(malformed) == "malformed_credentials"
        client.seen.append(("malformed", str(dict(malformed.headers)) + malformed.text))

        # A project-scoped key sees only its project; its admin sees only its keys.
        projects = client.call("GET", "/api/v1/projects", writer_a["key"]).json()["projects"]
        assert [p["name"] for p in projects] == ["proj-a"]
        listed = client.call("GET", "/api/v1/keys", admin_a["key"]).json()["keys"]
        assert {k["key_id"] for k in listed} == {writer_a["key_id"], admin_a["key_id"]}
        minted = client.call("POST", "/api/v1/keys", admin_a["key"], record=False,
                             json={"name": "a2", "scopes": ["read"]})
        assert minted.status_code == 201 and minted.json()["project"] == "proj-a"

        # The listing: every key, no secrets, statuses right, last use recorded off the hot
        # path (within a reload interval).
        deadline = time.monotonic() + PROPAGATION_DEADLINE_S
        while True:
            keys = {k["key_id"]: k for k in client.call(
                "GET", "/api/v1/keys", admin["key"]).json()["keys"]}
            if keys[reader["key_id"]]["last_used_at"] is not None:
                break
            assert time.monotonic() < deadline, "last_used_at was never written"
            time.sleep(0.2)  # waiting on another task's timer: nothing to await from here
        assert keys[revoked["key_id"]]["status"] == "revoked"
        assert keys[expiring["key_id"]]["status"] == "expired"
        assert keys[reader["key_id"]]["status"] == "active"
        assert keys[reader["key_id"]]["scopes"] == ["read"]
        assert keys[writer_a["key_id"]]["project"] == "proj-a"
        assert keys[writer["key_id"]]["display_prefix"] == writer["display_prefix"]

        with psycopg.connect(server_env["DATABASE_URL"]) as conn:
            stored = conn.execute("SELECT key_hash, display_prefix FROM api_keys").fetchall()
        raw_keys = [k["key"] for k in (reader, writer, writer_a, admin, admin_a, revoked,
                                       expiring)] + [minted.json()["key"]]
        for key_hash, _ in stored:
            assert len(bytes(key_hash)) == 32
            assert all(bytes(key_hash) != key.encode() for key in raw_keys)
    finally:
        client.close()

    # No key in any response but the one that created it, nor in any log line.
    secrets_ = [*raw_keys, TEST_API_KEY, unknown_key]
    for request, text in client.seen:
        for secret in secrets_:
            assert secret not in text, f"a key leaked in the answer to {request}"
    log = server.log_text()
    assert "created by bootstrap" in log  # the log does mention key events, by id only
    for secret in secrets_:
        assert secret not in log
        assert secret[len("mlrun_"):] not in log


def test_revocation_reaches_a_second_server_process(
    server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess]
) -> None:
    first = ServerProcess(server_env, tmp_path / "first.log")
    second_env = {**server_env, "MLRUN_DATA_DIR": str(tmp_path / "second-data")}
    second = ServerProcess(second_env, tmp_path / "second.log")
    servers.extend([first, second])
    first.start()
    second.start()
    a, b = Recorder(first.base_url), Recorder(second.base_url)
    try:
        created = mint(a, name="shared", scopes=["read"])
        key, key_id = created["key"], created["key_id"]
        assert a.call("GET", "/api/v1/projects", key).status_code == 200

        # A key minted on one process works on the other after its next reload.
        deadline = time.monotonic() + PROPAGATION_DEADLINE_S
        while (status := b.call("GET", "/api/v1/projects", key).status_code) != 200:
            assert status == 401
            assert time.monotonic() < deadline, "the second server never learned the key"
            time.sleep(0.1)  # observing another process: there is no event to wait on

        revoked = a.call("DELETE", f"/api/v1/keys/{key_id}", TEST_API_KEY)
        assert revoked.status_code == 200
        assert a.call("GET", "/api/v1/projects", key).status_code == 401  # at once, locally

        started = time.monotonic()
        while (status := b.call("GET", "/api/v1/projects", key).status_code) == 200:
            assert time.monotonic() - started < PROPAGATION_DEADLINE_S, (
                "the second server still accepts a revoked key")
            time.sleep(0.1)
        assert status == 401
        assert error_code(b.call("GET", "/api/v1/projects", key)) == "invalid_credentials"
        # And it stays refused (a reload cannot bring it back).
        time.sleep(2.5)
        assert b.call("GET", "/api/v1/projects", key).status_code == 401
        assert a.call("GET", "/api/v1/projects", key).status_code == 401
    finally:
        a.close()
        b.close()
    for process in (first, second):
        assert process.stop() == 0, process.log_text()[-3000:]
        assert "Traceback" not in process.log_text()
        assert key not in process.log_text()
