"""The read API over HTTP, end to end: a real `mlrun serve` on real PostgreSQL, ClickHouse 18.16
and S3, fed through the write API, read back through the read API.

One server per module (start-up costs seconds); each test works in its own project or runs, so
tests do not see each other's data. What must hold: every filter and every malformed
parameter (400 `invalid_field` naming it), summaries that stay right after retries, replays,
out-of-order batches and rewrites, series that collapse duplicate steps, paging, comparison,
auth, and the OpenAPI document covering every route.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.postgres import fresh_database
from server_process import TEST_API_KEY, ServerProcess, real_backend_env

pytestmark = pytest.mark.timeout(180)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
T0_MS = 1_700_000_000_000


def module_server_env(postgres_dsn: str, clickhouse_server: Any, s3_server: Any) -> dict[str, str]:
    """Environment of a server on the session's real backends, fresh databases of its own."""
    return {
        "API_HOST": "127.0.0.1",
        "API_HTTP_PORT": "0",
        "API_GRPC_PORT": "0",
        "MLRUN_API_KEY": TEST_API_KEY,
        **real_backend_env(database_url=postgres_dsn, clickhouse=clickhouse_server,
                           clickhouse_database=f"test_{uuid.uuid4().hex[:16]}", s3=s3_server,
                           bucket=f"test-{uuid.uuid4().hex[:12]}"),
        "MLRUN_STARTUP_TIMEOUT_S": "30",
    }


def start_module_server(env: dict[str, str], log_dir: Path) -> ServerProcess:
    """The server's data dir (its bootstrap key file) sits in `log_dir`, a pytest temp dir
    that pytest rotates: nothing is left behind in /tmp."""
    process = ServerProcess({**env, "MLRUN_DATA_DIR": str(log_dir / "data")},
                            log_dir / "server.log")
    try:
        process.start()
    except BaseException:
        process.kill()
        raise
    return process


@pytest.fixture(scope="module")
def server(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with fresh_database(postgres_server.dsn()) as dsn:
        process = start_module_server(module_server_env(dsn, clickhouse_server, s3_server),
                                      tmp_path_factory.mktemp("query-server"))
        try:
            yield process
        finally:
            code = process.stop()
        assert code == 0, process.log_text()[-3000:]
        assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
        yield http


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def new_run(client: httpx.Client, project: str, **fields: Any) -> str:
    run_id: str = ok(client.post("/api/v1/runs", json={"project": project, **fields}), 201)[
        "run_id"]
    return run_id


def send(client: httpx.Client, run_id: str, points: list[tuple[str, int, float]],
         batch_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"run_id": run_id, "metrics": [
        {"name": n, "step": s, "value": v, "timestamp": T0_MS + s} for n, s, v in points],
        **extra}
    if batch_id is not None:
        body["batch_id"] = batch_id
    result: dict[str, Any] = ok(client.post("/api/v1/ingest/batch", json=body))
    return result


def project_name() -> str:
    return f"p{uuid.uuid4().hex[:10]}"


def run_ids(page: dict[str, Any]) -> list[str]:
    return [run["run_id"] for run in page["runs"]]


# --------------------------------------------------------------------------- listing


def test_listing_filters_sorts_and_pages(client: httpx.Client) -> None:
    project = project_name()
    ids = []
    for index in range(7):
        ids.append(new_run(
            client, project, name=f"exp-{index}", run_id=f"{project}-r{index}",
            tags={"team": "cv" if index % 2 else "nlp", **({"best": "yes"} if index == 3 else {})},
            config={"lr": [0.1, 0.01, 0.001, 1e-4, 0.5, "auto", 3][index], "opt": "adam"}))
    ok(client.post(f"/api/v1/runs/{ids[2]}/finish", json={"status": "failed"}))
    ok(client.post(f"/api/v1/runs/{ids[4]}/finish", json={"status": "finished"}))
    newest_first = list(reversed(ids))

    def listed(**params: Any) -> dict[str, Any]:
        result: dict[str, Any] = ok(client.get("/api/v1/runs", params={"project": project,
                                                                       **params}))
        return result

    assert run_ids(listed()) == newest_first
    assert run_ids(listed(sort="created_at")) == ids
    assert run_ids(listed(status="failed,finished")) == [ids[4], ids[2]]
    assert run_ids(listed(tags="team=cv")) == [ids[5], ids[3], ids[1]]
    assert run_ids(listed(tags="team=cv,best")) == [ids[3]]
    assert run_ids(listed(tags="best=no")) == []
    assert run_ids(listed(params="lr>=0.01", sort="name")) == [ids[0], ids[1], ids[4], ids[6]]
    assert run_ids(listed(params="lr<1e-2")) == [ids[3], ids[2]]
    assert run_ids(listed(params="lr=auto")) == [ids[5]]
    assert run_ids(listed(params="lr!=auto,opt=adam,lr>0.2")) == [ids[6], ids[4]]
    assert run_ids(listed(params="lr>0.05", tags="team=nlp")) == [ids[6], ids[4], ids[0]]
    assert run_ids(listed(q="EXP-5")) == [ids[5]]
    assert run_ids(listed(q=f"{project}-r6")) == [ids[6]]
    by_duration = listed(sort="-duration")["runs"]
    durations = [r["duration_s"] for r in by_duration]
    assert durations[0] >= durations[1] > 0 and durations[2:] == [None] * 5
    assert {r["run_id"] for r in by_duration[:2]} == {ids[2], ids[4]}
    assert run_ids({"runs": by_duration[2:]}) == [ids[6], ids[5], ids[3], ids[1], ids[0]]

    first = listed(limit=3, include_total="true")
    assert first["total"] == 7 and run_ids(first) == newest_first[:3]
    second = listed(limit=3, cursor=first["next_cursor"])
    assert run_ids(second) == newest_first[3:6] and second["total"] is None
    third = listed(limit=3, cursor=second["next_cursor"])
    assert run_ids(third) == newest_first[6:] and third["next_cursor"] is None
    exact = listed(limit=7)
    assert len(exact["runs"]) == 7 and exact["next_cursor"] is None

    run = listed(q="exp-0")["runs"][0]
    assert run["params"] == {"lr": "0.1", "opt": "adam"} and run["tags"] == {"team": "nlp"}
    assert run["created_at"].endswith("Z") and run["status"] == "running"
    assert run["duration_s"] is None and run["finished_at"] is None


def test_a_cursor_stays_stable_when_runs_are_created_between_pages(client: httpx.Client) -> None:
    project = project_name()
    ids = [new_run(client, project, run_id=f"{project}-{i}") for i in range(5)]
    first = ok(client.get("/api/v1/runs", params={"project": project, "limit": 2}))
    newcomers = [new_run(client, project, run_id=f"{project}-late{i}") for i in range(3)]
    rest = ok(client.get("/api/v1/runs", params={"project": project, "limit": 10,
                                                 "cursor": first["next_cursor"]}))
    assert run_ids(first) + run_ids(rest) == list(reversed(ids))
    assert not set(newcomers) & set(run_ids(rest))


@pytest.mark.parametrize(("params", "field"), [
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"status": "sleeping"}, "status"), ({"sort": "colour"}, "sort"), ({"sort": "metric:"}, "sort"),
    ({"params": "lr"}, "params"), ({"params": "lr>abc"}, "params"), ({"params": "=1"}, "params"),
    ({"params": "lr>1e99999"}, "params"), ({"tags": "=x"}, "tags"), ({"tags": "a\\"}, "tags"),
    ({"created_after": "yesterday"}, "created_after"),
    ({"created_before": "2024-13-01"}, "created_before"), ({"cursor": "nonsense"}, "cursor"),
    ({"include_total": "maybe"}, "include_total"), ({"colour": "red"}, "colour"),
    ({"q": "a\x00b"}, "q"),
])
def test_every_malformed_listing_parameter_is_a_400_naming_it(
    client: httpx.Client, params: dict[str, str], field: str
) -> None:
    error = ok(client.get("/api/v1/runs", params=params), 400)["error"]
    assert error["field"] == field, error
    assert error["code"] in ("invalid_field", "invalid_cursor")


def test_a_cursor_of_another_sort_is_refused(client: httpx.Client) -> None:
    project = project_name()
    for index in range(3):
        new_run(client, project, name=f"n{index}")
    page = ok(client.get("/api/v1/runs", params={"project": project, "limit": 1}))
    error = ok(client.get("/api/v1/runs", params={"project": project, "sort": "name",
                                                  "cursor": page["next_cursor"]}), 400)["error"]
    assert error == {"code": "invalid_cursor", "field": "cursor",
                     "message": "the cursor belongs to another sort order"}


def test_sort_by_a_metrics_last_value(client: httpx.Client) -> None:
    project = project_name()
    losses = {"a": 0.5, "b": 0.1, "c": 0.9, "d": None, "e": 0.3}
    for name, loss in losses.items():
        run_id = new_run(client, project, run_id=f"{project}-{name}")
        if loss is not None:
            send(client, run_id, [("loss", 0, 5.0), ("loss", 1, loss)], batch_id="b")
    ascending = ok(client.get("/api/v1/runs", params={"project": project,
                                                      "sort": "metric:loss"}))
    assert [r.rsplit("-", 1)[1] for r in run_ids(ascending)] == ["b", "e", "a", "c", "d"]
    pages, cursor = [], None
    while True:
        params: dict[str, Any] = {"project": project, "sort": "-metric:loss", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = ok(client.get("/api/v1/runs", params=params))
        pages.append([r.rsplit("-", 1)[1] for r in run_ids(page)])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [["c", "a"], ["e", "b"], ["d"]]


# --------------------------------------------------------------------------- run detail


def test_summaries_survive_retries_replays_out_of_order_batches_and_rewrites(
    client: httpx.Client,
) -> None:
    project = project_name()
    run_id = new_run(client, project, name="sum", tags={"k": "v"}, config={"lr": 0.01})
    upper = [("loss", s, 100.0 - s * 0.1) for s in range(100, 200)]
    lower = [("loss", s, 100.0 - s * 0.1) for s in range(100)]
    send(client, run_id, upper, batch_id="upper")           # out of order: later steps first
    send(client, run_id, lower, batch_id="lower")
    assert send(client, run_id, upper, batch_id="upper")["duplicate"] is True  # a retry
    send(client, run_id, lower)  # a replay without batch_id: stored twice in ClickHouse
    send(client, run_id, lower[:10])
    send(client, run_id, [("acc", 3, 0.7)], batch_id="acc")

    detail = ok(client.get(f"/api/v1/runs/{run_id}"))
    assert detail["params"] == {"lr": "0.01"} and detail["tags"] == {"k": "v"}
    assert detail["artifacts_count"] == 0 and detail["status"] == "running"
    summary = {s["name"]: s for s in detail["metrics_summary"]}
    assert summary["loss"] == {"name": "loss", "count": 200, "last_step": 199,
                               "last_value": pytest.approx(80.1), "min": pytest.approx(80.1),
                               "max": 100.0}
    assert summary["acc"] == {"name": "acc", "count": 1, "last_step": 3, "last_value": 0.7,
                              "min": 0.7, "max": 0.7}

    send(client, run_id, [("loss", 199, 42.0)], batch_id="rewrite")  # last write wins
    rewritten = {s["name"]: s for s in ok(client.get(f"/api/v1/runs/{run_id}"))[
        "metrics_summary"]}["loss"]
    assert (rewritten["last_value"], rewritten["count"]) == (42.0, 200)

    raw = ok(client.get(f"/api/v1/runs/{run_id}/metrics",
                        params={"names": "loss", "method": "raw"}))["series"][0]
    assert raw["total_points"] == 200 and len(raw["points"]) == 200
    assert [p["step"] for p in raw["points"]] == list(range(200))
    assert raw["points"][-1]["value"] == 42.0 and raw["points"][0]["timestamp"] == T0_MS


def test_unknown_run_is_404_and_a_malformed_id_400(client: httpx.Client) -> None:
    assert ok(client.get("/api/v1/runs/no-such-run"), 404)["error"]["code"] == "run_not_found"
    assert ok(client.get("/api/v1/runs/no-such-run/metrics"), 404)["error"]["field"] == "run_id"
    assert ok(client.get("/api/v1/runs/-bad/metrics"), 400)["error"]["field"] == "run_id"


# --------------------------------------------------------------------------- series


def test_series_methods_and_raw_paging(client: httpx.Client) -> None:
    run_id = new_run(client, project_name())
    points = [("wave", s, float((s * 37) % 101)) for s in range(0, 5000)]
    for start in range(0, 5000, 1000):
        send(client, run_id, points[start:start + 1000], batch_id=f"w{start}")
    send(client, run_id, [("spike", s, 1000.0 if s == 2345 else 0.0) for s in range(5000)],
         batch_id="spike")

    def series(**params: Any) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = ok(client.get(f"/api/v1/runs/{run_id}/metrics",
                                                     params=params))["series"]
        return result

    for method in ("lttb", "minmax", "avg"):
        (wave,) = series(names="wave", method=method, max_points=100)
        assert wave["downsampled"] is True and wave["method"] == method
        assert wave["total_points"] == 5000 and 2 < len(wave["points"]) <= 100
        assert wave["points"][0]["step"] == 0 and wave["points"][-1]["step"] == 4999
    (spike,) = series(names="spike", method="minmax", max_points=50)
    assert {"step": 2345, "value": 1000.0, "timestamp": T0_MS + 2345} in spike["points"]

    (small,) = series(names="wave", start_step=10, end_step=19, max_points=1000)
    assert small["downsampled"] is False and [p["step"] for p in small["points"]] == list(
        range(10, 20))

    collected, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"method": "raw", "max_points": 1500, "names": "wave"}
        if cursor:
            params = {"method": "raw", "max_points": 1500, "cursor": cursor}
        (page,) = series(**params)
        collected += [p["step"] for p in page["points"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert collected == list(range(5000)) and pages == 4

    both = ok(client.get(f"/api/v1/runs/{run_id}/metrics", params={"max_points": 10}))
    assert both["available_metrics"] == ["spike", "wave"]
    assert [s["name"] for s in both["series"]] == ["spike", "wave"]
    (missing,) = series(names="nothing")
    assert missing["points"] == [] and missing["total_points"] == 0


@pytest.mark.parametrize(("params", "field"), [
    ({"method": "fancy"}, "method"), ({"max_points": "1"}, "max_points"),
    ({"max_points": "100001"}, "max_points"), ({"start_step": "-1"}, "start_step"),
    ({"start_step": "9", "end_step": "3"}, "start_step"), ({"cursor": "zzz"}, "cursor"),
    ({"names": "a,b", "method": "lttb", "cursor": "zzz"}, "cursor"), ({"step": "1"}, "step"),
])
def test_malformed_series_parameters_are_400s(
    client: httpx.Client, params: dict[str, str], field: str
) -> None:
    run_id = new_run(client, project_name())
    error = ok(client.get(f"/api/v1/runs/{run_id}/metrics", params=params), 400)["error"]
    assert error["field"] == field, error


def test_system_metrics_are_keyed_by_timestamp(client: httpx.Client) -> None:
    run_id = new_run(client, project_name())
    samples = [{"name": "cpu", "step": i, "value": float(i % 7), "timestamp": T0_MS + i * 1000}
               for i in range(300)]
    ok(client.post("/api/v1/ingest/batch", json={"run_id": run_id, "batch_id": "sys",
                                                 "system_metrics": samples}))
    result = ok(client.get(f"/api/v1/runs/{run_id}/system_metrics",
                           params={"max_points": 30, "method": "minmax"}))
    assert result["available_metrics"] == ["cpu"]
    (cpu,) = result["series"]
    assert cpu["downsampled"] and cpu["total_points"] == 300 and len(cpu["points"]) <= 30
    assert cpu["points"][0] == {"step": 0, "value": 0.0, "timestamp": T0_MS}
    assert cpu["points"][-1]["timestamp"] == T0_MS + 299_000
    window = ok(client.get(f"/api/v1/runs/{run_id}/system_metrics", params={
        "start_ms": T0_MS + 10_000, "end_ms": T0_MS + 12_000, "method": "raw"}))["series"][0]
    assert [p["step"] for p in window["points"]] == [10, 11, 12]


# --------------------------------------------------------------------------- compare


def test_compare_aligns_runs_and_reports_common_metrics(client: httpx.Client) -> None:
    project = project_name()
    runs = [new_run(client, project, run_id=f"{project}-{i}") for i in range(3)]
    for index, run_id in enumerate(runs):
        send(client, run_id, [("loss", s, 1.0 / (s + 1)) for s in range(400)] +
             [(f"only{index}", 0, 1.0)] + ([("acc", 1, 0.5)] if index < 2 else []),
             batch_id="c")
    result = ok(client.post("/api/v1/runs/compare", json={
        "run_ids": runs, "max_points": 50, "alignment": "relative_time"}))
    assert result["common_metrics"] == ["loss"] and result["alignment"] == "relative_time"
    assert [r["run_id"] for r in result["runs"]] == runs
    for run in result["runs"]:
        (loss,) = run["series"]
        assert loss["name"] == "loss" and loss["total_points"] == 400
        assert len(loss["points"]) <= 50 and loss["points"][0]["step"] == 0
        started_ms = ok(client.get(f"/api/v1/runs/{run['run_id']}"))["created_at"]
        assert loss["points"][0]["timestamp"] < T0_MS  # shifted by the run's start
        assert started_ms == run["started_at"]

    chosen = ok(client.post("/api/v1/runs/compare", json={
        "run_ids": runs[:2], "metric_names": ["acc", "only0"], "method": "minmax",
        "alignment": "absolute_time"}))
    first, second = chosen["runs"]
    assert [s["name"] for s in first["series"]] == ["acc", "only0"]
    assert first["series"][1]["points"] == [{"step": 0, "value": 1.0, "timestamp": T0_MS}]
    assert second["series"][1]["points"] == [] and chosen["common_metrics"] == ["acc", "loss"]

    error = ok(client.post("/api/v1/runs/compare", json={"run_ids": [runs[0], "ghost"]}),
               404)["error"]
    assert error["field"] == "run_ids[1]"
    too_many = ok(client.post("/api/v1/runs/compare",
                              json={"run_ids": [f"r{i}" for i in range(101)]}), 400)["error"]
    assert too_many["field"] == "run_ids"


# --------------------------------------------------------------------------- auth, openapi


def test_reads_need_a_key(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.base_url, timeout=10) as anonymous:
        for path in ("/api/v1/runs", "/api/v1/runs/x", "/api/v1/runs/x/metrics",
                     "/api/v1/runs/x/system_metrics"):
            assert anonymous.get(path).status_code == 401
        assert anonymous.post("/api/v1/runs/compare", json={"run_ids": ["x"]}).status_code == 401
        assert anonymous.get("/api/v1/runs", headers={"X-API-Key": "wrong"}).status_code == 401
        assert anonymous.get("/api/v1/runs", headers={"X-API-Key": TEST_API_KEY}
                             ).status_code == 200


def test_openapi_covers_every_route_with_auth_and_errors(client: httpx.Client) -> None:
    document = ok(client.get("/openapi.json"))
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    runs = paths["/api/v1/runs"]["get"]
    assert {p["name"] for p in runs["parameters"]} == {
        "project", "status", "tags", "params", "q", "created_after", "created_before", "sort",
        "limit", "cursor", "include_total"}
    assert runs["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert runs["x-mlrun-scope"] == "read"
    assert set(runs["responses"]) == {"200", "400", "401", "403", "413", "431", "500", "503"}
    # 431 is the app's own answer now (the documented 16 KiB), with the error body.
    assert runs["responses"]["431"]["content"] == runs["responses"]["400"]["content"]
    assert all(p["allowEmptyValue"] for p in runs["parameters"])
    assert runs["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    assert paths["/health"]["get"]["security"] == []
    assert paths["/ready"]["get"]["responses"]["503"]["content"]["application/json"][
        "schema"] == {"$ref": "#/components/schemas/ReadinessBody"}
    for route in ("/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/metrics",
                  "/api/v1/runs/{run_id}/system_metrics", "/api/v1/ingest/batch",
                  "/openapi.json"):
        assert route in paths
    assert paths["/api/v1/runs/compare"]["post"]["requestBody"]["content"][
        "application/json"]["schema"] == {"$ref": "#/components/schemas/CompareRuns"}
    schemas = document["components"]["schemas"]
    assert schemas["RunPage"]["required"] == ["runs", "next_cursor"]
    assert "bearerAuth" in document["components"]["securitySchemes"]


def test_the_read_path_on_asyncio(server_env: dict[str, str], tmp_path: Path,
                                  servers: list[ServerProcess]) -> None:
    """The same reads with the server on asyncio: concurrent reads and their failures (a 404
    raised inside a task group) behave as on trio."""
    process = ServerProcess(server_env, tmp_path / "asyncio.log", backend="asyncio")
    servers.append(process)
    process.start()
    with httpx.Client(base_url=process.base_url, headers=AUTH, timeout=30) as client:
        run_id = new_run(client, "aio")
        send(client, run_id, [("loss", s, float(s % 7)) for s in range(500)], batch_id="a")
        assert run_ids(ok(client.get("/api/v1/runs", params={"project": "aio"}))) == [run_id]
        detail = ok(client.get(f"/api/v1/runs/{run_id}"))
        assert detail["metrics_summary"][0]["count"] == 500
        (loss,) = ok(client.get(f"/api/v1/runs/{run_id}/metrics",
                                params={"names": "loss", "max_points": 50}))["series"]
        assert loss["downsampled"] and len(loss["points"]) <= 50
        missing = ok(client.get("/api/v1/runs/ghost/metrics", params={"names": "loss"}), 404)
        assert missing["error"]["code"] == "run_not_found"
    assert process.stop() == 0, process.log_text()[-3000:]
    assert "Traceback" not in process.log_text()


# --------------------------------------------------------------------------- layouts, children


def as_columns(series: dict[str, Any]) -> dict[str, Any]:
    """A `layout=points` series in the `layout=columns` form, computed here from its points."""
    points = series["points"]
    rest = {k: v for k, v in series.items() if k != "points"}
    return {"name": series["name"], "steps": [p["step"] for p in points],
            "values": [p["value"] for p in points],
            "timestamps": [p["timestamp"] for p in points], **rest}


def test_the_columns_layout_carries_exactly_the_points_layout(client: httpx.Client) -> None:
    """`layout=columns` (what the web UI asks for) answers the same series as the default,
    as three arrays: every method, ranges, raw pages with their cursors, system metrics and
    comparisons in each alignment."""
    project = project_name()
    runs = [new_run(client, project, run_id=f"{project}-{i}") for i in range(2)]
    for index, run_id in enumerate(runs):
        send(client, run_id, [("wave", s, float((s * 37 + index) % 101)) for s in range(3000)]
             + [("small", s, 0.25 * s) for s in range(5)], batch_id="l")
    ok(client.post("/api/v1/ingest/batch", json={"run_id": runs[0], "batch_id": "sys",
                                                 "system_metrics": [
        {"name": "cpu", "step": i, "value": float(i % 5), "timestamp": T0_MS + i * 1000}
        for i in range(400)]}))

    def both_layouts(path: str, params: dict[str, Any]) -> tuple[Any, Any]:
        points = ok(client.get(path, params=params))
        columns = ok(client.get(path, params={**params, "layout": "columns"}))
        return points, columns

    metrics = f"/api/v1/runs/{runs[0]}/metrics"
    for params in ({"method": "lttb", "max_points": 100}, {"method": "minmax", "max_points": 60},
                   {"method": "avg", "max_points": 40}, {"start_step": 100, "end_step": 2000,
                                                          "max_points": 80},
                   {"names": "small"}, {"names": "wave,ghost"},
                   {"method": "raw", "max_points": 1000, "names": "wave"}):
        points, columns = both_layouts(metrics, params)
        assert columns == {**points, "series": [as_columns(s) for s in points["series"]]}
        assert all("points" not in s for s in columns["series"])
        if params.get("method") == "raw":  # the cursors of both layouts page alike
            cursor = points["series"][0]["next_cursor"]
            assert cursor is not None and cursor == columns["series"][0]["next_cursor"]
            page, page_columns = both_layouts(metrics, {"method": "raw", "max_points": 1000,
                                                        "cursor": cursor})
            assert page_columns["series"] == [as_columns(s) for s in page["series"]]
            assert page_columns["series"][0]["steps"][0] == 1000
    points, columns = both_layouts(f"/api/v1/runs/{runs[0]}/system_metrics",
                                   {"method": "minmax", "max_points": 30})
    assert columns["series"] == [as_columns(s) for s in points["series"]]
    assert columns["series"][0]["timestamps"][0] == T0_MS

    for alignment in ("step", "relative_time", "absolute_time"):
        for method in ("lttb", "minmax", "avg"):
            body = {"run_ids": runs, "alignment": alignment, "method": method, "max_points": 50}
            compared = ok(client.post("/api/v1/runs/compare", json=body))
            compared_columns = ok(client.post("/api/v1/runs/compare",
                                              json={**body, "layout": "columns"}))
            assert compared_columns == {**compared, "runs": [
                {**run, "series": [as_columns(s) for s in run["series"]]}
                for run in compared["runs"]]}
    refused = ok(client.get(metrics, params={"layout": "rows"}), 400)["error"]
    assert refused["field"] == "layout"


def test_tags_and_params_come_with_every_run_read_in_key_order(client: httpx.Client) -> None:
    """A listing page reads each row's tags and params in its own statement (per row, by
    primary key): the listing, a metric-sorted listing, a total and the run detail agree,
    keys in order, and runs without children answer empty objects."""
    project = project_name()
    tags = {"zeta": "1", "alpha": "2", "mid": "x,y"}
    params = {"lr": "0.001", "batch": "32", "opt": "adam", "a b": "c=d"}
    rich = new_run(client, project, run_id=f"{project}-rich", tags=tags, config=params)
    bare = new_run(client, project, run_id=f"{project}-bare")
    send(client, rich, [("loss", 1, 0.5)], batch_id="r")
    send(client, bare, [("loss", 1, 0.7)], batch_id="b")
    expected = {rich: (tags, params), bare: ({}, {})}
    for query in ({"project": project}, {"project": project, "include_total": "true"},
                  {"project": project, "sort": "metric:loss"},
                  {"project": project, "tags": "alpha=2", "params": "lr<1"}):
        page = ok(client.get("/api/v1/runs", params=query))
        assert page["runs"], query
        for run in page["runs"]:
            want_tags, want_params = expected[run["run_id"]]
            assert list(run["tags"].items()) == sorted(want_tags.items()), query
            assert list(run["params"].items()) == sorted(want_params.items()), query
    detail = ok(client.get(f"/api/v1/runs/{rich}"))
    assert list(detail["tags"].items()) == sorted(tags.items())
    assert list(detail["params"].items()) == sorted(params.items())
    assert ok(client.get(f"/api/v1/runs/{bare}"))["tags"] == {}
