"""The write path over HTTP, end to end: a real `mlrun serve` on real PostgreSQL and ClickHouse.

What is checked is what was stored: points are counted back from ClickHouse (raw rows and
deduplicated), params and tags read back from PostgreSQL.
"""

from __future__ import annotations

import gzip
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(120)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    server_env["MLRUN_MAX_METRIC_NAMES_PER_RUN"] = "5"
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=15) as http:
        yield http


def new_run(client: httpx.Client, **fields: Any) -> str:
    response = client.post("/api/v1/runs", json={"project": "vision", **fields})
    assert response.status_code in (200, 201), response.text
    run_id: str = response.json()["run_id"]
    return run_id


def batch(run_id: str, batch_id: str | None, steps: range, name: str = "loss",
          **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run_id": run_id,
        "metrics": [{"name": name, "value": step * 0.5, "step": step,
                     "timestamp": 1_700_000_000_000 + step} for step in steps],
        **extra,
    }
    if batch_id is not None:
        body["batch_id"] = batch_id
    return body


def stored_points(reader: ClickHouseReader, run_id: str) -> tuple[int, int]:
    """(raw rows, distinct (metric, step)) of a run in ClickHouse."""
    raw = reader.scalar(f"SELECT count() FROM metrics WHERE run_id = '{run_id}'")
    distinct = reader.scalar(
        f"SELECT count() FROM (SELECT name, step FROM metrics WHERE run_id = '{run_id}' "
        "GROUP BY name, step)")
    return int(raw), int(distinct)


def test_init_three_batches_finish_and_everything_is_stored(
    client: httpx.Client, clickhouse_reader: ClickHouseReader, server_env: dict[str, str]
) -> None:
    response = client.post("/api/v1/runs", json={
        "project": "vision", "name": "resnet", "run_id": "run-e2e-1",
        "tags": {"team": "cv"}, "config": {"lr": 0.01, "epochs": 3, "opt": "adam"}})
    assert response.status_code == 201, response.text
    assert response.json() | {"warnings": []} == {
        "run_id": "run-e2e-1", "project": "vision", "name": "resnet", "status": "running",
        "created": True, "warnings": []}
    again = client.post("/api/v1/runs", json={"project": "vision", "run_id": "run-e2e-1"})
    assert again.status_code == 200 and again.json()["created"] is False

    for index in range(3):
        response = client.post("/api/v1/ingest/batch", json=batch(
            "run-e2e-1", f"b{index}", range(index * 100, index * 100 + 100),
            params=[{"name": "seed", "value": 7}], tags=[{"key": "stage", "value": "train"}],
            system_metrics=[{"name": "cpu", "value": 12.5, "step": index}]))
        assert response.status_code == 200, response.text
        assert response.json() == {"status": "ok", "accepted": 101, "duplicate": False,
                                   "warnings": []}
    finish = client.post("/api/v1/runs/run-e2e-1/finish", json={"status": "finished"})
    assert finish.status_code == 200 and finish.json()["status"] == "finished"

    assert stored_points(clickhouse_reader, "run-e2e-1") == (300, 300)
    values = clickhouse_reader.rows(
        "SELECT step, value, timestamp_ms FROM metrics WHERE run_id = 'run-e2e-1' ORDER BY step")
    assert [(r["step"], r["value"], r["timestamp_ms"]) for r in values] == [
        (s, s * 0.5, 1_700_000_000_000 + s) for s in range(300)]
    assert clickhouse_reader.scalar(
        "SELECT count() FROM system_metrics WHERE run_id = 'run-e2e-1'") == 3

    with psycopg.connect(server_env["DATABASE_URL"]) as conn:
        params = dict(conn.execute(
            "SELECT key, value FROM run_params WHERE run_id = 'run-e2e-1'").fetchall())
        tags = dict(conn.execute(
            "SELECT key, value FROM run_tags WHERE run_id = 'run-e2e-1'").fetchall())
    assert params == {"lr": "0.01", "epochs": "3", "opt": "adam", "seed": "7"}
    assert tags == {"team": "cv", "stage": "train"}


def test_duplicate_conflict_and_missing_batch_id(
    client: httpx.Client, clickhouse_reader: ClickHouseReader
) -> None:
    run_id = new_run(client)
    first = client.post("/api/v1/ingest/batch", json=batch(run_id, "same", range(10)))
    assert first.json()["duplicate"] is False and first.json()["accepted"] == 10
    again = client.post("/api/v1/ingest/batch", json=batch(run_id, "same", range(10)))
    assert again.status_code == 200 and again.json()["duplicate"] is True

    conflict = client.post("/api/v1/ingest/batch", json=batch(run_id, "same", range(11)))
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "batch_conflict"
    assert conflict.json()["error"]["field"] == "batch_id"
    assert stored_points(clickhouse_reader, run_id) == (10, 10)  # the conflict harmed nothing

    anonymous = client.post("/api/v1/ingest/batch", json=batch(run_id, None, range(100, 105)))
    assert anonymous.status_code == 200
    assert [w["code"] for w in anonymous.json()["warnings"]] == ["not_deduplicated"]


def test_fifty_concurrent_identical_submissions_are_stored_once(
    client: httpx.Client, server: ServerProcess, clickhouse_reader: ClickHouseReader
) -> None:
    run_id = new_run(client)
    body = json.dumps(batch(run_id, "hot", range(1000))).encode()
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def submit() -> None:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as own:
            response = own.post("/api/v1/ingest/batch", content=body,
                                headers={"content-type": "application/json"})
        with lock:
            results.append(response)

    threads = [threading.Thread(target=submit) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert [r.status_code for r in results] == [200] * 50, [r.text for r in results][:3]
    assert sum(not r.json()["duplicate"] for r in results) >= 1
    assert stored_points(clickhouse_reader, run_id) == (1000, 1000)


def test_columnar_series_gzip_and_last_write_wins(
    client: httpx.Client, clickhouse_reader: ClickHouseReader
) -> None:
    run_id = new_run(client)
    body = {"run_id": run_id, "batch_id": "cols", "series": [
        {"name": "acc", "steps": [0, 1, 2, 2], "values": [0.1, 0.2, 0.3, 0.35]}]}
    response = client.post("/api/v1/ingest/batch", content=gzip.compress(json.dumps(body).encode()),
                           headers={"content-encoding": "gzip", "content-type": "application/json"})
    assert response.status_code == 200 and response.json()["accepted"] == 4
    rewrite = {"run_id": run_id, "batch_id": "cols-2", "metrics": [
        {"name": "acc", "value": 0.9, "step": 1}]}
    assert client.post("/api/v1/ingest/batch", json=rewrite).status_code == 200
    latest = clickhouse_reader.rows(
        f"SELECT step, argMax(value, version) AS value FROM metrics WHERE run_id = '{run_id}' "
        "GROUP BY step ORDER BY step")
    assert [(r["step"], r["value"]) for r in latest] == [(0, 0.1), (1, 0.9), (2, 0.35)]


def test_metric_name_guardrail_degrades_with_a_structured_warning(
    client: httpx.Client, clickhouse_reader: ClickHouseReader
) -> None:
    run_id = new_run(client)  # this server allows 5 metric names per run
    body = {"run_id": run_id, "batch_id": "wide", "metrics": [
        {"name": f"m{i}", "value": 1.0, "step": 0} for i in range(8)]}
    response = client.post("/api/v1/ingest/batch", json=body)
    assert response.status_code == 200
    assert response.json()["accepted"] == 5
    (warning,) = response.json()["warnings"]
    assert warning["code"] == "metric_names_limit"
    assert warning["limit"] == 5 and warning["dropped"] == 3
    known = {"run_id": run_id, "batch_id": "known", "metrics": [
        {"name": "m0", "value": 2.0, "step": 1}]}
    assert client.post("/api/v1/ingest/batch", json=known).json()["warnings"] == []
    assert stored_points(clickhouse_reader, run_id) == (6, 6)


def test_bad_input_gets_clear_errors_and_the_server_keeps_serving(
    client: httpx.Client, server: ServerProcess
) -> None:
    run_id = new_run(client)

    def post(content: bytes, **headers: str) -> httpx.Response:
        return client.post("/api/v1/ingest/batch", content=content,
                           headers={"content-type": "application/json", **headers})

    malformed = post(b'{"run_id": "x", ')
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "malformed_json"
    wrong_type = client.post("/api/v1/ingest/batch", json={
        "run_id": run_id, "metrics": [{"name": "loss", "value": 1.0, "step": "three"}]})
    assert wrong_type.status_code == 400
    assert wrong_type.json()["error"] == {
        "code": "invalid_field", "field": "metrics[0].step",
        "message": "metrics[0].step: Expected `int`, got `str`"}
    negative = client.post("/api/v1/ingest/batch", json=batch(run_id, "neg", range(-1, 0)))
    assert negative.status_code == 400 and negative.json()["error"]["field"] == "metrics[0].step"
    unknown_field = client.post("/api/v1/ingest/batch", json={"run_id": run_id, "metricz": []})
    assert unknown_field.status_code == 400 and "metricz" in unknown_field.text
    nan = post(b'{"run_id": "%s", "metrics": [{"name": "l", "value": NaN, "step": 1}]}'
               % run_id.encode())
    assert nan.status_code == 400 and nan.json()["error"]["code"] == "malformed_json"
    oversized = post(b" " * (17 * 1024 * 1024))
    assert oversized.status_code == 413
    assert oversized.json()["error"]["code"] == "payload_too_large"
    unknown_run = client.post("/api/v1/ingest/batch", json=batch("no-such-run", "u", range(3)))
    assert unknown_run.status_code == 404
    assert unknown_run.json()["error"]["code"] == "run_not_found"
    mismatch = client.post("/api/v1/ingest/batch", json={
        "run_id": run_id, "series": [{"name": "a", "steps": [1, 2], "values": [1.0]}]})
    assert mismatch.status_code == 400
    assert mismatch.json()["error"]["field"] == "series[0].values"

    assert client.post(f"/api/v1/runs/{run_id}/finish", json={}).status_code == 200
    finished = client.post("/api/v1/ingest/batch", json=batch(run_id, "late", range(3)))
    assert finished.status_code == 409 and finished.json()["error"]["code"] == "run_finished"
    heartbeat = client.post(f"/api/v1/runs/{run_id}/heartbeat")
    assert heartbeat.status_code == 409

    for response in (malformed, wrong_type, oversized, unknown_run, finished):
        assert "Traceback" not in response.text
    assert client.get("/health").status_code == 200
    assert new_run(client)  # still serving writes


def test_auth_is_required_on_every_api_route(server: ServerProcess) -> None:
    run_id = f"auth-{uuid.uuid4().hex[:8]}"
    routes = [
        ("GET", "/api/v1/projects", None),
        ("POST", "/api/v1/projects", {"name": "p"}),
        ("POST", "/api/v1/runs", {"project": "p", "run_id": run_id}),
        ("POST", "/api/v1/ingest/batch", batch(run_id, "a", range(1))),
        ("POST", f"/api/v1/runs/{run_id}/finish", {}),
        ("POST", f"/api/v1/runs/{run_id}/heartbeat", None),
    ]
    with httpx.Client(base_url=server.base_url, timeout=10) as anonymous:
        for method, path, body in routes:
            for headers in ({}, {"Authorization": "Bearer mlrun_wrong"}, {"X-API-Key": "nope"},
                            {"Authorization": "Basic abc"}):
                response = anonymous.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["error"]["code"] in (
                    "missing_credentials", "invalid_credentials", "malformed_credentials")
                assert "mlrun_wrong" not in response.text
        ok = anonymous.post("/api/v1/runs", json={"project": "p"},
                            headers={"X-API-Key": TEST_API_KEY})
        assert ok.status_code == 201
    assert TEST_API_KEY not in server.log_text()
    assert anonymous.is_closed


def test_projects_are_created_on_first_use_and_listed(client: httpx.Client) -> None:
    created = client.post("/api/v1/projects", json={"name": "nlp", "description": "text"})
    assert created.status_code == 201 and created.json()["name"] == "nlp"
    assert client.post("/api/v1/projects", json={"name": "nlp"}).status_code == 409
    new_run(client, project="speech")
    names = {p["name"] for p in client.get("/api/v1/projects").json()["projects"]}
    assert {"nlp", "speech"} <= names
    bad = client.post("/api/v1/projects", json={"name": "../etc"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "name"
