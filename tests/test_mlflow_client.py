"""The official MLflow client (`mlflow-skinny`, from the package index) against a live `mlrun serve`
on real PostgreSQL, ClickHouse 18.16 and S3: the fluent API and `MlflowClient` end to end, then
the same data read back through our own API (`/api/v1/runs/...`: params, tags, summaries,
downsampled series), MLflow's errors as the client raises them, and the credentials it sends.

One server per module; each test works in its own experiment. The client's retries are cut
down (MLFLOW_HTTP_REQUEST_MAX_RETRIES) so a wrong 5xx fails the test in seconds, not minutes.
The server's pipeline holds 999 rows (MLRUN_PIPELINE_MAX_ROWS), one less than MLflow's largest
batch, so a full pipeline (429 REQUEST_LIMIT_EXCEEDED) can be shown on cue.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException, RestException

from backends.postgres import fresh_database
from server_process import TEST_API_KEY, ServerProcess, real_backend_env

pytestmark = pytest.mark.timeout(240)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(scope="module")
def server(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log_dir: Path = tmp_path_factory.mktemp("mlflow-server")
    with fresh_database(postgres_server.dsn()) as dsn:
        env = {
            "API_HOST": "127.0.0.1", "API_HTTP_PORT": "0", "API_GRPC_PORT": "0",
            "MLRUN_API_KEY": TEST_API_KEY, "MLRUN_STARTUP_TIMEOUT_S": "30",
            "MLRUN_DATA_DIR": str(log_dir / "data"), "MLRUN_PIPELINE_MAX_ROWS": "999",
            **real_backend_env(database_url=dsn, clickhouse=clickhouse_server,
                               clickhouse_database=f"test_{uuid.uuid4().hex[:16]}",
                               s3=s3_server, bucket=f"test-{uuid.uuid4().hex[:12]}"),
        }
        process = ServerProcess(env, log_dir / "server.log")
        try:
            process.start()
            yield process
        finally:
            code = process.stop()
        assert code == 0, process.log_text()[-3000:]
        assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


@pytest.fixture(scope="module")
def tracking(server: ServerProcess) -> Iterator[str]:
    """The client pointed at the server with the bootstrap key as MLFLOW_TRACKING_TOKEN."""
    saved = dict(os.environ)
    os.environ.update({
        "MLFLOW_TRACKING_URI": server.base_url, "MLFLOW_TRACKING_TOKEN": TEST_API_KEY,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    })
    mlflow.set_tracking_uri(server.base_url)
    try:
        yield server.base_url
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
        yield http


def experiment_name() -> str:
    return f"exp-{uuid.uuid4().hex[:10]}"


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def error_code(exc: pytest.ExceptionInfo[MlflowException]) -> str:
    code: str = exc.value.error_code
    return code


# --------------------------------------------------------------------------- the fluent flow


def test_fluent_run_is_logged_whole_and_reads_back_in_both_apis(
        tracking: str, api: httpx.Client) -> None:
    name = experiment_name()
    assert mlflow.get_experiment_by_name(name) is None  # 404 RESOURCE_DOES_NOT_EXIST -> None
    experiment = mlflow.set_experiment(name)  # get-by-name, then create
    frame = pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [0, 1, 0]})
    with mlflow.start_run(run_name="outer") as run:
        mlflow.log_param("lr", 0.001)
        mlflow.log_params({"optimizer": "adam", "epochs": 3})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        for index in range(6):  # no step: all at step 0, each with its own timestamp
            mlflow.log_metric("stepless", float(index))
            time.sleep(0.002)
        mlflow.log_metrics({"acc": 0.5, "f1": 0.25}, step=7)
        for step in range(20):
            mlflow.log_metrics({"async_loss": float(step)}, step=step, synchronous=False)
        mlflow.flush_async_logging()
        mlflow.set_tag("team", "vision")
        mlflow.set_tags({"stage": "baseline", "owner": "ci"})
        mlflow.log_input(mlflow.data.from_pandas(frame, name="toy"), context="training")
        with mlflow.start_run(run_name="inner", nested=True) as child:
            mlflow.log_metric("inner_metric", 3.0, step=1)
    run_id = run.info.run_id

    client = MlflowClient()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.end_time is not None
    assert got.info.run_name == "outer"
    assert got.info.experiment_id == experiment.experiment_id
    assert got.info.lifecycle_stage == "active"
    assert got.data.params == {"lr": "0.001", "optimizer": "adam", "epochs": "3"}
    assert {"team": "vision", "stage": "baseline", "owner": "ci",
            "mlflow.runName": "outer"}.items() <= got.data.tags.items()
    assert got.data.metrics == {"loss": 0.2, "stepless": 5.0, "acc": 0.5, "f1": 0.25,
                                "async_loss": 19.0}
    [dataset_input] = got.inputs.dataset_inputs
    assert dataset_input.dataset.name == "toy"
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context",
                                                               "training")]
    inner = client.get_run(child.info.run_id)
    assert inner.data.tags["mlflow.parentRunId"] == run_id
    assert inner.info.status == "FINISHED"

    loss = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(s, 1.0 / (s + 1)) for s in range(5)]
    stepless = client.get_metric_history(run_id, "stepless")
    assert sorted(m.value for m in stepless) == [float(i) for i in range(6)]
    assert {m.step for m in stepless} == {0}
    assert len({m.timestamp for m in stepless}) == 6
    assert len(client.get_metric_history(run_id, "async_loss")) == 20

    # Our own API: the same run, its params and tags, summaries, and the step-less history
    # as a curve (one point per synthetic step, in time order).
    detail = ok(api.get(f"/api/v1/runs/{run_id}"))
    assert detail["project"] == name and detail["status"] == "finished"
    assert detail["params"]["lr"] == "0.001" and detail["tags"]["team"] == "vision"
    summaries = {s["name"]: s for s in detail["metrics_summary"]}
    assert summaries["loss"]["count"] == 5 and summaries["loss"]["min"] == 0.2
    assert summaries["stepless"]["count"] == 6 and summaries["stepless"]["last_value"] == 5.0
    series = ok(api.get(f"/api/v1/runs/{run_id}/metrics",
                        params={"names": "stepless,async_loss", "max_points": 4}))
    by_name = {s["name"]: s for s in series["series"]}
    curve = by_name["stepless"]
    assert curve["total_points"] == 6
    steps = [p["step"] for p in curve["points"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) and steps[0] == 0
    timestamps = [p["timestamp"] for p in curve["points"]]
    assert timestamps == sorted(timestamps)
    assert by_name["async_loss"]["total_points"] == 20 and by_name["async_loss"]["downsampled"]


def test_retried_log_batch_is_stored_once(tracking: str, api: httpx.Client) -> None:
    client = MlflowClient()
    experiment_id = client.create_experiment(experiment_name())
    run_id = client.create_run(experiment_id).info.run_id
    t0 = int(time.time() * 1000)
    body = {"run_id": run_id, "metrics": [
        {"key": "m", "value": float(i), "timestamp": t0 + i, "step": 0} for i in range(50)]}
    for _ in range(3):  # the client retries a POST whose answer it did not get
        ok(api.post("/api/2.0/mlflow/runs/log-batch", json=body))
    history = client.get_metric_history(run_id, "m")
    assert sorted((m.timestamp, m.value) for m in history) == [
        (t0 + i, float(i)) for i in range(50)]
    assert ok(api.get(f"/api/v1/runs/{run_id}"))["metrics_summary"][0]["count"] == 50
    # The MlflowClient's own log_batch (entities) and paging of get-history.
    client.log_batch(run_id, metrics=[Metric("p", float(i), t0 + i, i) for i in range(1, 901)],
                     params=[Param("a", "1")], tags=[RunTag("t", "x")])
    page = ok(api.get("/api/2.0/mlflow/metrics/get-history",
                      params={"run_id": run_id, "metric_key": "p", "max_results": 500}))
    assert len(page["metrics"]) == 500 and page["next_page_token"]
    rest = ok(api.get("/api/2.0/mlflow/metrics/get-history", params={
        "run_id": run_id, "metric_key": "p", "max_results": 500,
        "page_token": page["next_page_token"]}))
    assert [m["step"] for m in page["metrics"] + rest["metrics"]] == list(range(1, 901))
    assert "next_page_token" not in rest
    assert len(client.get_metric_history(run_id, "p")) == 900
    # A full pipeline: 429 in MLflow's shape with Retry-After, which the client honours.
    full = api.post("/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": [
        {"key": "q", "value": 1.0, "timestamp": t0, "step": i} for i in range(1000)]})
    assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1
    assert full.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"


# --------------------------------------------------------------------------- search


def test_search_runs_and_experiments(tracking: str) -> None:
    client = MlflowClient()
    name = experiment_name()
    experiment_id = client.create_experiment(name, tags={"area": "search"})
    runs = []
    for index, (lr, acc) in enumerate([("0.1", 0.5), ("0.01", 0.9), ("0.001", 0.7)]):
        run = client.create_run(experiment_id, run_name=f"r{index}", tags={"grp": "a" if
                                                                          index else "b"})
        client.log_param(run.info.run_id, "lr", lr)
        client.log_metric(run.info.run_id, "acc", acc, step=1)
        client.set_terminated(run.info.run_id, "FINISHED" if index != 2 else "FAILED")
        runs.append(run.info.run_id)

    found = client.search_runs([experiment_id], "metrics.acc > 0.6", order_by=["metrics.acc DESC"])
    assert [r.info.run_id for r in found] == [runs[1], runs[2]]
    found = client.search_runs([experiment_id], "params.lr = '0.1' and tags.grp = 'b'")
    assert [r.info.run_id for r in found] == [runs[0]]
    found = client.search_runs([experiment_id], "attributes.status = 'FAILED'")
    assert [r.info.run_id for r in found] == [runs[2]]
    found = client.search_runs([experiment_id], "tags.grp IN ('a') and params.lr LIKE '0.0%'",
                               order_by=["params.lr ASC"])
    assert [r.info.run_id for r in found] == [runs[2], runs[1]]
    page = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=2)
    assert [r.info.run_id for r in page] == runs[:2] and page.token
    rest = client.search_runs([experiment_id], order_by=["attributes.start_time ASC"],
                              max_results=2, page_token=page.token)
    assert [r.info.run_id for r in rest] == runs[2:] and not rest.token

    frame = mlflow.search_runs([experiment_id], filter_string="metrics.acc >= 0.5",
                               order_by=["metrics.acc ASC"])
    assert isinstance(frame, pd.DataFrame)
    assert list(frame["run_id"]) == [runs[0], runs[2], runs[1]]
    assert list(frame["params.lr"]) == ["0.1", "0.001", "0.01"]
    as_list = mlflow.search_runs([experiment_id], output_format="list")
    assert {r.info.run_id for r in as_list} == set(runs)

    client.delete_run(runs[0])
    assert {r.info.run_id for r in client.search_runs([experiment_id])} == set(runs[1:])
    deleted = client.search_runs([experiment_id], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in deleted] == [runs[0]]
    client.restore_run(runs[0])
    assert len(client.search_runs([experiment_id])) == 3

    experiments = client.search_experiments(filter_string=f"name = '{name}'")
    assert [(e.experiment_id, e.tags["area"]) for e in experiments] == [(experiment_id,
                                                                          "search")]
    assert [e.name for e in client.search_experiments(filter_string="tags.area = 'search'")
            ] == [name]


# --------------------------------------------------------------------------- errors and auth


def test_errors_are_mlflow_exceptions_with_mlflow_codes(tracking: str,
                                                         api: httpx.Client) -> None:
    client = MlflowClient()
    name = experiment_name()
    experiment_id = client.create_experiment(name)
    with pytest.raises(MlflowException) as duplicate:
        client.create_experiment(name)
    assert error_code(duplicate) == "RESOURCE_ALREADY_EXISTS"
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "lr", "0.1")
    client.log_param(run_id, "lr", "0.1")  # the same value again is fine
    with pytest.raises(MlflowException) as changed:
        client.log_param(run_id, "lr", "0.2")
    assert error_code(changed) == "INVALID_PARAMETER_VALUE"
    # MLflow's own caps, in characters of any UTF-8 (far past btree's ~2700-byte entries).
    long_param, long_tag = "é" * 6000, "字" * 8000
    client.log_param(run_id, "long", long_param)
    client.set_tag(run_id, "long", long_tag)
    stored = client.get_run(run_id).data
    assert (stored.params["long"], stored.tags["long"]) == (long_param, long_tag)
    ours = api.get(f"/api/v1/runs/{run_id}").json()
    assert (ours["params"]["long"], ours["tags"]["long"]) == (long_param, long_tag)
    # One past them is MLflow's error, from the server (the raw request skips the client's
    # own checks), naming the field, and stores nothing.
    for route, body, cap in (
            ("runs/log-parameter", {"run_id": run_id, "key": "longer", "value": "x" * 6001},
             "6000"),
            ("runs/set-tag", {"run_id": run_id, "key": "longer", "value": "x" * 8001}, "8000")):
        rejected = api.post(f"/api/2.0/mlflow/{route}", json=body)
        assert rejected.status_code == 400, rejected.text
        assert rejected.json()["error_code"] == "INVALID_PARAMETER_VALUE"
        assert cap in rejected.json()["message"] and "value" in rejected.json()["message"]
    assert "longer" not in client.get_run(run_id).data.params
    assert "longer" not in client.get_run(run_id).data.tags
    client.set_terminated(run_id)
    client.set_tag(run_id, "best", "yes")  # tagging a finished run (the best of a sweep)
    assert client.get_run(run_id).data.tags["best"] == "yes"
    with pytest.raises(MlflowException) as finished:
        client.log_metric(run_id, "late", 1.0)
    assert error_code(finished) == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as malformed:
        client.search_runs([experiment_id], "metrics.acc >>> 1")
    assert error_code(malformed) == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as missing:
        client.get_run("0" * 32)
    assert error_code(missing) == "RESOURCE_DOES_NOT_EXIST"

    oversized = api.post("/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": [
        {"key": "m", "value": 1.0, "timestamp": 1, "step": i} for i in range(1001)]})
    assert oversized.status_code == 400
    assert oversized.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    unknown = api.post("/api/2.0/mlflow/registered-models/create", json={"name": "x"})
    assert (unknown.status_code, unknown.json()["error_code"]) == (404, "ENDPOINT_NOT_FOUND")
    # MLflow's surface keeps MLflow's shape: it is not part of our own OpenAPI document.
    assert not [p for p in ok(api.get("/openapi.json"))["paths"] if "mlflow" in p]
    anonymous = httpx.get(f"{tracking}/api/2.0/mlflow/experiments/get",
                          params={"experiment_id": experiment_id})
    assert (anonymous.status_code, anonymous.json()["error_code"]) == (401, "UNAUTHENTICATED")


def test_keys_as_token_and_basic_auth_and_a_revoked_key(tracking: str, api: httpx.Client,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    name = experiment_name()
    MlflowClient().create_experiment(name)
    reader = ok(api.post("/api/v1/keys", json={"name": "reader", "scopes": ["read"]}), 201)
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "anyone")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader["key"])
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    with pytest.raises(MlflowException) as denied:
        client.create_run(experiment.experiment_id)
    assert error_code(denied) == "PERMISSION_DENIED"
    basic = base64.b64encode(f"u:{reader['key']}".encode()).decode()
    assert httpx.get(f"{tracking}/api/2.0/mlflow/experiments/get-by-name",
                     params={"experiment_name": name},
                     headers={"Authorization": f"Basic {basic}"}).status_code == 200
    ok(api.delete(f"/api/v1/keys/{reader['key_id']}"))
    with pytest.raises(RestException) as revoked:
        client.get_experiment_by_name(name)
    assert error_code(revoked) == "UNAUTHENTICATED"


# --------------------------------------------------------------------------- artifacts


def test_log_artifacts_through_the_proxy(tracking: str, api: httpx.Client,
                                         tmp_path: Path) -> None:
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(1024 * 1024) * 30)  # 30 MiB: split into store parts
    folder = tmp_path / "cfg"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.json").write_text('{"a": 1}')
    (folder / "nested" / "b.txt").write_text("bee")
    mlflow.set_experiment(experiment_name())
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(big))
        mlflow.log_artifacts(str(folder), artifact_path="cfg")
        mlflow.log_dict({"k": [1, 2]}, "extra/d.json")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    client = MlflowClient()
    run_id = run.info.run_id
    listed = {(f.path, f.is_dir, f.file_size) for f in client.list_artifacts(run_id)}
    assert listed == {("weights.bin", False, big.stat().st_size), ("cfg", True, None),
                      ("extra", True, None)}
    assert {(f.path, f.is_dir) for f in client.list_artifacts(run_id, "cfg")} == {
        ("cfg/a.json", False), ("cfg/nested", True)}
    out = Path(client.download_artifacts(run_id, "", str(tmp_path / "out")))
    assert (out / "weights.bin").read_bytes() == big.read_bytes()
    assert (out / "cfg" / "nested" / "b.txt").read_text() == "bee"
    assert mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/extra/d.json") == {"k": [1, 2]}
    by_run = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/cfg/a.json",
                                                 dst_path=str(tmp_path / "by-run"))
    assert Path(by_run).read_text() == '{"a": 1}'  # runs:/ asks logged-models/search first
    # The same artifacts in our own API.
    names = {a["name"] for a in ok(api.get(f"/api/v1/runs/{run_id}/artifacts"))["artifacts"]}
    assert names == {"weights.bin", "cfg/a.json", "cfg/nested/b.txt", "extra/d.json"}


# --------------------------------------------------------------------------- edits and UI reads


def test_experiment_lifecycle_run_edits_and_bulk_interval(tracking: str,
                                                          api: httpx.Client) -> None:
    client = MlflowClient()
    name, renamed = experiment_name(), experiment_name()
    experiment_id = client.create_experiment(name)
    client.set_experiment_tag(experiment_id, "owner", "ci")
    client.rename_experiment(experiment_id, renamed)
    assert client.get_experiment_by_name(name) is None
    assert client.get_experiment(experiment_id).tags["owner"] == "ci"
    client.delete_experiment(experiment_id)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    assert renamed not in {e.name for e in client.search_experiments()}
    assert renamed in {e.name for e in client.search_experiments(
        view_type=ViewType.DELETED_ONLY)}
    client.restore_experiment(experiment_id)

    default_run = client.create_run("0")  # MLflow's default experiment: our project Default
    assert client.get_experiment("0").name == "Default"
    assert client.get_run(default_run.info.run_id).info.experiment_id == "0"
    run_id = client.create_run(experiment_id, run_name="before").info.run_id
    client.set_tag(run_id, "scratch", "x")
    client.delete_tag(run_id, "scratch")
    client.update_run(run_id, name="after")
    got = client.get_run(run_id)
    assert "scratch" not in got.data.tags and got.info.run_name == "after"
    assert got.data.tags["mlflow.runName"] == "after"
    assert ok(api.get(f"/api/v1/runs/{run_id}"))["name"] == "after"
    with pytest.raises(MlflowException) as missing_tag:
        client.delete_tag(run_id, "scratch")
    assert error_code(missing_tag) == "RESOURCE_DOES_NOT_EXIST"

    t0 = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric("curve", float(s), t0 + s, s) for s in range(500)])
    bulk = ok(api.get("/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", params={
        "run_ids": [run_id], "metric_key": "curve", "max_results": 50}))["metrics"]
    steps = [m["step"] for m in bulk]
    assert 2 < len(steps) <= 50 and steps[0] == 0 and steps[-1] == 499
    assert steps == sorted(steps) and {m["run_id"] for m in bulk} == {run_id}
