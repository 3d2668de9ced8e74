"""Data lifecycle end to end: a real `mlrun serve` on real PostgreSQL, ClickHouse 18.16 and S3
(`rclone serve s3`), what it stored counted straight from each backend (never through the
server under test).

One server per module, with a short settle time and housekeeping interval; each test works on
runs of its own. What must hold: a run deleted while writers stream into it and readers read it
is gone from every read at once, writers get 404 (never a 5xx), and after its purge job nothing
of it is left in ClickHouse, PostgreSQL or S3 while other runs are untouched; a project deletes
the same way, its scoped keys with it; a server killed mid-purge finishes the job after a
restart; retention drops whole expired months from every table and read, and rebuilds the
summaries and block rollups of runs that kept some points; the ledger window; stale uploads.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import grpc
import httpx
import psycopg
import pytest

from mlrun.server.errors import MlrunError
from mlrun.server.storage.objects.s3 import open_s3_store
from mlrun.server.usecases.lifecycle import month_before
from mlrun.wire.proto.mlrun.v1 import lifecycle_pb2

from backends.postgres import fresh_database
from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess, real_backend_env

pytestmark = pytest.mark.timeout(240)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
NOW_MS = int(time.time() * 1000)
# 2020: far outside the module server's retention window (MLRUN_RETENTION_DAYS=365).
OLD_JAN_MS = int(datetime(2020, 1, 15, tzinfo=UTC).timestamp() * 1000)
OLD_FEB_MS = int(datetime(2020, 2, 15, tzinfo=UTC).timestamp() * 1000)
JOB_DEADLINE_S = 60.0


class Deployment:
    """A server and its databases, for counting straight from the backends."""

    def __init__(self, env: dict[str, str], ch: ClickHouseReader, bucket_dir: Path,
                 log_dir: Path) -> None:
        self.env = env
        self.ch = ch
        self.bucket_dir = bucket_dir
        self.log_dir = log_dir
        self.server: ServerProcess | None = None

    def start(self, *, backend: str = "trio", **extra_env: str) -> ServerProcess:
        process = ServerProcess({**self.env, **extra_env,
                                 "MLRUN_DATA_DIR": str(self.log_dir / "data")},
                                self.log_dir / "server.log", backend=backend)
        try:
            process.start()
        except BaseException:
            process.kill()
            raise
        self.server = process
        return process

    @property
    def url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    def pg(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.env["DATABASE_URL"], autocommit=True) as conn:
            cursor = conn.execute(sql, args)
            return cursor.fetchall() if cursor.description else []

    def pg_count(self, table: str, run_id: str) -> int:
        ((count,),) = self.pg(f"SELECT count(*) FROM {table} WHERE run_id = %s", (run_id,))
        return int(count)

    def ch_counts(self, run_id: str) -> dict[str, int]:
        """Rows of the point tables; distinct keys of the aggregating ones (their raw row
        count depends on how far ClickHouse merged)."""
        counted = {"metrics": "count()", "system_metrics": "count()",
                   "metrics_summary": "uniqExact(name)", "metric_blocks": "uniqExact(name, block)"}
        return {table: int(self.ch.scalar(
            f"SELECT {what} FROM {table} WHERE run_id = '{run_id}'"))
            for table, what in counted.items()}

    def pg_counts(self, run_id: str) -> dict[str, int]:
        return {table: self.pg_count(table, run_id)
                for table in ("runs", "run_params", "run_tags", "run_metric_names", "artifacts",
                              "ingest_batches", "purge_runs")}

    def objects(self) -> set[str]:
        """Every object key in the bucket, straight from rclone's data directory."""
        if not self.bucket_dir.exists():
            return set()
        return {str(p.relative_to(self.bucket_dir)) for p in self.bucket_dir.rglob("*")
                if p.is_file()}


@contextlib.contextmanager
def deployment(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
               log_dir: Path, *, local_store: bool = False) -> Iterator[Deployment]:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    database = f"test_{uuid.uuid4().hex[:16]}"
    with fresh_database(postgres_server.dsn()) as dsn:
        env = {
            "API_HOST": "127.0.0.1", "API_HTTP_PORT": "0", "API_GRPC_PORT": "0",
            "MLRUN_API_KEY": TEST_API_KEY, "MLRUN_STARTUP_TIMEOUT_S": "30",
            **real_backend_env(database_url=dsn, clickhouse=clickhouse_server,
                               clickhouse_database=database, s3=s3_server, bucket=bucket),
            "MLRUN_PURGE_SETTLE_S": "2", "MLRUN_HOUSEKEEPING_INTERVAL_S": "0.5",
            "MLRUN_RETENTION_DAYS": "365",
        }
        bucket_dir = s3_server.data_dir / bucket
        if local_store:  # the server's own store under its data dir
            env = {k: v for k, v in env.items() if not k.startswith("MINIO_")}
            bucket_dir = log_dir / "data" / "artifacts"
        deployed = Deployment(env, ClickHouseReader(clickhouse_server, database), bucket_dir,
                              log_dir)
        try:
            yield deployed
        finally:
            if deployed.server is not None:
                deployed.server.stop(timeout_s=15)


@pytest.fixture(scope="module")
def dep(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with deployment(postgres_server, clickhouse_server, s3_server,
                    tmp_path_factory.mktemp("lifecycle")) as deployed:
        deployed.start()
        yield deployed


@pytest.fixture
def client(dep: Deployment) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dep.url, headers=AUTH, timeout=30) as opened:
        yield opened


# --- helpers -----------------------------------------------------------------------------------


def new_run(client: httpx.Client, project: str, run_id: str | None = None) -> str:
    body: dict[str, Any] = {"project": project, "config": {"lr": 0.01}, "tags": {"team": "a"}}
    if run_id is not None:
        body["run_id"] = run_id
    response = client.post("/api/v1/runs", json=body)
    assert response.status_code == 201, response.text
    created: str = response.json()["run_id"]
    return created


def seed(client: httpx.Client, run_id: str, *, steps: int, start_step: int = 0,
         timestamp_ms: int = NOW_MS, batch: str | None = None) -> None:
    """Two metrics of `steps` points each and 100 system metrics, in one bulk batch."""
    step_list = list(range(start_step, start_step + steps))
    body = {
        "run_id": run_id, "batch_id": batch or uuid.uuid4().hex,
        "series": [{"name": name, "steps": step_list,
                    "values": [float(s % 97) + offset for s in step_list],
                    "timestamps": [timestamp_ms + s for s in step_list]}
                   for name, offset in (("loss", 0.0), ("acc", 1.0))],
        "system_metrics": [{"name": "cpu", "value": 1.0 + i, "step": i,
                            "timestamp": timestamp_ms + i}
                           for i in range(100)],
    }
    response = client.post("/api/v1/ingest/batch", json=body)
    assert response.status_code == 200, response.text


def add_artifact(client: httpx.Client, run_id: str, name: str, *, finalize: bool = True
                 ) -> str:
    grant = client.post(f"/api/v1/runs/{run_id}/artifacts", json={"name": name}).json()
    put = httpx.put(grant["upload_url"], content=b"x" * 1000, headers=grant["required_headers"],
                    timeout=30)
    assert put.status_code == 200, put.text
    if finalize:
        done = client.post(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/finalize")
        assert done.status_code == 200, done.text
    artifact_id: str = grant["artifact_id"]
    return artifact_id


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/api/v1/purge_jobs/{job_id}").json()
        if job["state"] == "done":
            return job
        time.sleep(0.2)  # bounded by the deadline: the job runs in the server
    raise AssertionError(f"purge job {job_id} not done in {JOB_DEADLINE_S}s: {job}")


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# --- tests -------------------------------------------------------------------------------------


def test_delete_a_run_under_load(dep: Deployment, client: httpx.Client) -> None:
    project = f"p{uuid.uuid4().hex[:8]}"
    victim, keeper = new_run(client, project), new_run(client, project)
    for run_id in (victim, keeper):
        seed(client, run_id, steps=20_000)
        seed(client, run_id, steps=20_000, start_step=20_000)
    kept_artifact = add_artifact(client, keeper, "model.bin")
    multipart = client.post(f"/api/v1/runs/{victim}/artifacts",
                            json={"name": "big.bin", "size_bytes": 64 * 1024 * 1024}).json()
    assert multipart["multipart"] is not None
    victim_artifacts = {add_artifact(client, victim, "model.bin"),
                        add_artifact(client, victim, "pending/half.bin", finalize=False),
                        multipart["artifact_id"]}
    keeper_ch, keeper_pg = dep.ch_counts(keeper), dep.pg_counts(keeper)
    objects_before = dep.objects()
    assert any(victim in key for key in objects_before)

    statuses: list[tuple[str, int, str]] = []
    stop = threading.Event()

    def writer(index: int) -> None:
        with httpx.Client(base_url=dep.url, headers=AUTH, timeout=30) as http:
            step = 1_000_000 * (index + 1)
            while not stop.is_set():
                steps = list(range(step, step + 500))
                # A new metric name and tag per batch: each batch inserts rows that reference
                # the run (the path a concurrent delete races with), not only points.
                response = http.post("/api/v1/ingest/batch", json={
                    "run_id": victim, "batch_id": uuid.uuid4().hex,
                    "series": [{"name": name, "steps": steps, "values": [0.5] * 500}
                               for name in ("loss", f"w{index}-{step}")],
                    "tags": {f"w{index}": str(step)}})
                code = "" if response.status_code == 200 else error_code(response)
                statuses.append(("write", response.status_code, code))
                if response.status_code != 200:
                    return
                step += 500

    def reader() -> None:
        with httpx.Client(base_url=dep.url, headers=AUTH, timeout=30) as http:
            while not stop.is_set():
                for path in (f"/api/v1/runs/{victim}", f"/api/v1/runs/{victim}/metrics"):
                    response = http.get(path)
                    code = "" if response.status_code == 200 else error_code(response)
                    statuses.append(("read", response.status_code, code))
                    if response.status_code != 200:
                        return

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # writers and readers are at work
    deleted = client.delete(f"/api/v1/runs/{victim}")
    try:
        assert deleted.status_code == 202, deleted.text
        job = deleted.json()
        assert (job["kind"], job["target"], job["runs"], job["state"]) == (
            "run", victim, 1, "pending")
        assert job["objects_total"] == 3
        # Gone from every read at once.
        assert error_code(client.get(f"/api/v1/runs/{victim}")) == "run_not_found"
        assert error_code(client.get(f"/api/v1/runs/{victim}/metrics")) == "run_not_found"
        assert error_code(client.get(f"/api/v1/runs/{victim}/artifacts")) == "run_not_found"
        listed = client.get("/api/v1/runs", params={"project": project}).json()["runs"]
        assert [r["run_id"] for r in listed] == [keeper]
        compare = client.post("/api/v1/runs/compare", json={"run_ids": [victim, keeper]})
        assert compare.status_code == 404 and error_code(compare) == "run_not_found"
        again = client.delete(f"/api/v1/runs/{victim}")
        assert again.status_code == 404 and error_code(again) == "run_not_found"
        # The id stays reserved until the purge is done, for every writer of `runs`.
        reuse = client.post("/api/v1/runs", json={"project": project, "run_id": victim})
        assert reuse.status_code == 409 and error_code(reuse) == "run_deleting", reuse.text
        with pytest.raises(psycopg.Error) as refused:
            dep.pg("INSERT INTO runs (run_id, project_id) SELECT %s, id FROM projects LIMIT 1",
                   (victim,))
        assert refused.value.sqlstate == "MLR01"
    finally:
        for thread in threads:
            thread.join(timeout=30)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    writes = [s for s in statuses if s[0] == "write"]
    reads = [s for s in statuses if s[0] == "read"]
    assert writes and reads
    assert all(status < 500 for _, status, _ in statuses), statuses
    # Every writer and reader ended on a clear 404 run_not_found.
    assert [s for s in writes if s[1] != 200] == [("write", 404, "run_not_found")] * 4
    assert [s for s in reads if s[1] != 200] == [("read", 404, "run_not_found")] * 2

    done = wait_for_job(client, job["job_id"])
    assert done["phase"] == "done" and done["objects_deleted"] == 3
    assert done["points_removed"] >= 80_000 + 100
    assert done["ledger_rows_deleted"] >= 2
    # Nothing of the victim is left anywhere, counted in each backend.
    assert dep.ch_counts(victim) == dict.fromkeys(dep.ch_counts(victim), 0)
    assert dep.pg_counts(victim) == dict.fromkeys(dep.pg_counts(victim), 0)
    objects_after = dep.objects()
    assert not [key for key in objects_after if victim in key], objects_after
    assert objects_after == {k for k in objects_before
                             if not any(a in k for a in victim_artifacts)}
    # The keeper is untouched, in every backend and every read.
    assert dep.ch_counts(keeper) == keeper_ch
    assert dep.pg_counts(keeper) == keeper_pg
    kept = client.get(f"/api/v1/runs/{keeper}").json()
    assert {m["name"]: m["count"] for m in kept["metrics_summary"]} == {
        "loss": 40_000, "acc": 40_000}
    download = client.get(f"/api/v1/runs/{keeper}/artifacts/{kept_artifact}/download")
    assert httpx.get(download.json()["download_url"], timeout=30).content == b"x" * 1000
    # The id is free again, and a new run under it starts empty.
    assert client.post("/api/v1/runs", json={"project": project, "run_id": victim}
                       ).status_code == 201
    assert client.get(f"/api/v1/runs/{victim}").json()["metrics_summary"] == []
    metrics = client.get("/metrics").text
    assert "mlrun_purge_jobs_finished_total" in metrics
    points_line = next(line for line in metrics.splitlines()
                       if line.startswith("mlrun_purge_points_removed_total "))
    assert float(points_line.split()[1]) >= 80_100


def test_delete_a_project_with_its_runs_and_keys(dep: Deployment, client: httpx.Client) -> None:
    project, other = f"p{uuid.uuid4().hex[:8]}", f"p{uuid.uuid4().hex[:8]}"
    runs = [new_run(client, project) for _ in range(3)]
    survivor = new_run(client, other)
    for run_id in (*runs, survivor):
        seed(client, run_id, steps=1000)
    scoped = client.post("/api/v1/keys", json={"name": "scoped", "scopes": ["read", "admin"],
                                               "project": project}).json()["key"]
    writer = client.post("/api/v1/keys", json={"name": "w", "scopes": ["write", "read"]}
                         ).json()["key"]
    refused = httpx.delete(f"{dep.url}/api/v1/projects/{project}",
                           headers={"Authorization": f"Bearer {writer}"})
    assert refused.status_code == 403 and error_code(refused) == "missing_scope"
    wrong = httpx.delete(f"{dep.url}/api/v1/projects/{other}",
                         headers={"Authorization": f"Bearer {scoped}"})
    assert wrong.status_code == 403 and error_code(wrong) == "wrong_project"

    deleted = httpx.delete(f"{dep.url}/api/v1/projects/{project}",
                           headers={"Authorization": f"Bearer {scoped}"})
    assert deleted.status_code == 202, deleted.text
    job = deleted.json()
    assert (job["kind"], job["target"], job["runs"]) == ("project", project, 3)
    names = [p["name"] for p in client.get("/api/v1/projects").json()["projects"]]
    assert project not in names and other in names
    assert client.get("/api/v1/runs", params={"project": project}).json()["runs"] == []
    for run_id in runs:
        assert client.get(f"/api/v1/runs/{run_id}").status_code == 404
    missing = client.delete(f"/api/v1/projects/{project}")
    assert missing.status_code == 404 and error_code(missing) == "project_not_found"
    assert error_code(client.get("/api/v1/purge_jobs/purge_0123")) == "purge_job_not_found"
    assert error_code(client.get("/api/v1/purge_jobs/nope")) == "invalid_field"
    # The project's keys went with it (every process refuses them within the key refresh).
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = httpx.get(f"{dep.url}/api/v1/runs", headers={"Authorization": f"Bearer {scoped}"})
        if probe.status_code == 401:
            break
        time.sleep(0.2)  # bounded: the key view reloads every 2 s
    assert probe.status_code == 401 and error_code(probe) == "invalid_credentials"

    wait_for_job(client, job["job_id"])
    for run_id in runs:
        assert sum(dep.ch_counts(run_id).values()) == 0
        assert sum(dep.pg_counts(run_id).values()) == 0
    assert dep.ch_counts(survivor)["metrics"] == 2000
    assert client.get(f"/api/v1/runs/{survivor}").status_code == 200


def test_delete_over_grpc(dep: Deployment, client: httpx.Client) -> None:
    run_id = new_run(client, f"p{uuid.uuid4().hex[:8]}")
    seed(client, run_id, steps=500)
    assert dep.server is not None
    metadata = (("authorization", f"Bearer {TEST_API_KEY}"),)
    with grpc.insecure_channel(dep.server.grpc_target) as channel:
        delete = channel.unary_unary(
            "/mlrun.v1.LifecycleService/DeleteRun",
            request_serializer=lifecycle_pb2.DeleteRunRequest.SerializeToString,
            response_deserializer=lifecycle_pb2.PurgeJob.FromString)
        get = channel.unary_unary(
            "/mlrun.v1.LifecycleService/GetPurgeJob",
            request_serializer=lifecycle_pb2.GetPurgeJobRequest.SerializeToString,
            response_deserializer=lifecycle_pb2.PurgeJob.FromString)
        job = delete(lifecycle_pb2.DeleteRunRequest(run_id=run_id), metadata=metadata, timeout=10)
        assert (job.kind, job.target, job.runs) == ("run", run_id, 1)
        with pytest.raises(grpc.RpcError) as gone:
            delete(lifecycle_pb2.DeleteRunRequest(run_id=run_id), metadata=metadata, timeout=10)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND
        assert dict(gone.value.trailing_metadata() or ())["mlrun-error-code"] == "run_not_found"
        deadline = time.monotonic() + JOB_DEADLINE_S
        while get(lifecycle_pb2.GetPurgeJobRequest(job_id=job.job_id), metadata=metadata,
                  timeout=10).state != "done":
            assert time.monotonic() < deadline
            time.sleep(0.2)  # bounded by the deadline
    assert sum(dep.ch_counts(run_id).values()) == 0
    # A finished job stays readable for 30 days, then its record goes.
    assert client.get(f"/api/v1/purge_jobs/{job.job_id}").status_code == 200
    dep.pg("UPDATE purge_jobs SET finished_at = now() - interval '31 days' WHERE job_id = %s",
           (job.job_id,))
    while client.get(f"/api/v1/purge_jobs/{job.job_id}").status_code != 404:
        assert time.monotonic() < deadline, "the old job record was not pruned"
        time.sleep(0.2)  # bounded: pruning runs every housekeeping round


def test_retention_drops_expired_months_everywhere_and_rebuilds_rollups(
        dep: Deployment, client: httpx.Client) -> None:
    project = f"p{uuid.uuid4().hex[:8]}"
    old, straddle, fresh = (new_run(client, project) for _ in range(3))
    seed(client, old, steps=1000, timestamp_ms=OLD_JAN_MS)
    seed(client, straddle, steps=1000, timestamp_ms=OLD_FEB_MS)
    seed(client, straddle, steps=1000, start_step=1000)
    seed(client, fresh, steps=1000)
    fresh_before = client.get(f"/api/v1/runs/{fresh}").json()["metrics_summary"]

    deadline = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < deadline:
        expired = int(dep.ch.scalar(
            "SELECT count() FROM system.parts WHERE active AND database = currentDatabase()"
            " AND table IN ('metrics', 'system_metrics') AND partition IN ('202001', '202002')"))
        pending = dep.pg("SELECT count(*) FROM retention_rebuilds")[0][0]
        summary = client.get(f"/api/v1/runs/{straddle}").json()["metrics_summary"]
        if expired == 0 and pending == 0 and summary and summary[0]["count"] == 1000:
            break
        time.sleep(0.2)  # bounded: retention runs every housekeeping round
    # Expired months are gone from every table ...
    assert dep.ch.scalar(f"SELECT count() FROM metrics WHERE timestamp_ms < {NOW_MS - 86400000}"
                         ) == 0
    assert dep.ch.scalar("SELECT count() FROM system_metrics"
                         f" WHERE timestamp_ms < {NOW_MS - 86400000}") == 0
    assert dep.ch_counts(old) == {"metrics": 0, "system_metrics": 0, "metrics_summary": 0,
                                  "metric_blocks": 0}
    # ... and from every read; the run itself stays (params, tags, artifacts are kept).
    old_run = client.get(f"/api/v1/runs/{old}").json()
    assert old_run["metrics_summary"] == [] and old_run["params"] == {"lr": "0.01"}
    assert client.get(f"/api/v1/runs/{old}/metrics").json()["series"] == []
    assert client.get(f"/api/v1/runs/{old}/system_metrics").json()["series"] == []
    cpu = client.get(f"/api/v1/runs/{straddle}/system_metrics").json()["series"][0]
    assert min(p["timestamp"] for p in cpu["points"]) >= NOW_MS
    # A run with points on both sides keeps exactly its recent ones, summaries rebuilt.
    summary = {m["name"]: m for m in client.get(f"/api/v1/runs/{straddle}").json()[
        "metrics_summary"]}
    assert summary["loss"]["count"] == 1000 and summary["loss"]["last_step"] == 1999
    assert summary["loss"]["min"] == 0.0 and summary["acc"]["max"] == 97.0
    series = client.get(f"/api/v1/runs/{straddle}/metrics",
                        params={"names": "loss", "max_points": 100}).json()["series"][0]
    assert series["total_points"] == 1000 and series["points"][0]["step"] == 1000
    raw = client.get(f"/api/v1/runs/{straddle}/metrics",
                     params={"names": "loss", "method": "raw"}).json()["series"][0]
    assert [p["step"] for p in raw["points"]] == list(range(1000, 2000))
    assert dep.ch.scalar(f"SELECT min(block) FROM metric_blocks WHERE run_id = '{straddle}'"
                         ) == 1000 // 128
    compare = client.post("/api/v1/runs/compare", json={"run_ids": [straddle, fresh],
                                                        "metric_names": ["loss"]}).json()
    assert compare["runs"][0]["series"][0]["points"][0]["step"] == 1000
    # In-window data is untouched, summaries included.
    assert client.get(f"/api/v1/runs/{fresh}").json()["metrics_summary"] == fresh_before
    assert dep.ch_counts(fresh)["metrics"] == 2000
    assert dep.ch_counts(fresh)["system_metrics"] == 100


def test_ledger_window(dep: Deployment, client: httpx.Client) -> None:
    run_id = new_run(client, f"p{uuid.uuid4().hex[:8]}")
    inside, outside = uuid.uuid4().hex, uuid.uuid4().hex
    seed(client, run_id, steps=100, batch=inside)
    seed(client, run_id, steps=100, batch=outside)
    dep.pg("UPDATE ingest_batches SET created_at = now() - interval '6 days'"
           " WHERE batch_id = %s", (inside,))
    dep.pg("UPDATE ingest_batches SET created_at = now() - interval '8 days'"
           " WHERE batch_id = %s", (outside,))
    deadline = time.monotonic() + JOB_DEADLINE_S
    while dep.pg("SELECT count(*) FROM ingest_batches WHERE batch_id = %s", (outside,))[0][0]:
        assert time.monotonic() < deadline, "the ledger row outside the window was not pruned"
        time.sleep(0.2)  # bounded: pruning runs every housekeeping round
    assert dep.pg("SELECT count(*) FROM ingest_batches WHERE batch_id = %s", (inside,))[0][0] == 1

    def resend(batch: str) -> dict[str, Any]:
        steps = list(range(100))
        response = client.post("/api/v1/ingest/batch", json={
            "run_id": run_id, "batch_id": batch,
            "series": [{"name": name, "steps": steps,
                        "values": [float(s % 97) + offset for s in steps],
                        "timestamps": [NOW_MS + s for s in steps]}
                       for name, offset in (("loss", 0.0), ("acc", 1.0))],
            "system_metrics": [{"name": "cpu", "value": 1.0 + i, "step": i,
                                                "timestamp": NOW_MS + i}
                               for i in range(100)]})
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer

    # Inside the window a retry is a duplicate; outside it is stored again as new, and reads
    # still count every step once (last write wins per step).
    assert resend(inside)["duplicate"] is True
    assert resend(outside)["duplicate"] is False
    summary = client.get(f"/api/v1/runs/{run_id}").json()["metrics_summary"]
    assert {m["name"]: m["count"] for m in summary} == {"loss": 100, "acc": 100}
    series = client.get(f"/api/v1/runs/{run_id}/metrics", params={"names": "loss"}).json()
    assert series["series"][0]["total_points"] == 100


def start_multipart(client: httpx.Client, run_id: str, name: str
                    ) -> tuple[dict[str, Any], tuple[int, str]]:
    """A multipart upload with its first part uploaded: the grant and (1, the part's ETag)."""
    grant: dict[str, Any] = client.post(f"/api/v1/runs/{run_id}/artifacts", json={
        "name": name, "size_bytes": 64 * 1024 * 1024}).json()
    multipart = grant["multipart"]
    put = httpx.put(multipart["parts"][0]["url"], content=b"p" * multipart["part_size_bytes"],
                    headers=grant["required_headers"], timeout=60)
    assert put.status_code == 200, put.text
    return grant, (1, put.headers["etag"])


def complete_in_s3(dep: Deployment, key: str, upload_id: str, part: tuple[int, str]
                   ) -> MlrunError | None:
    """Complete a multipart upload straight in S3 (not through the server): None on success,
    the error when S3 refused (an aborted upload)."""
    async def complete() -> None:
        async with open_s3_store(endpoint=dep.env["MINIO_ENDPOINT"],
                                 access_key=dep.env["MINIO_ACCESS_KEY"],
                                 secret_key=dep.env["MINIO_SECRET_KEY"],
                                 bucket=dep.env["MINIO_BUCKET"]) as store:
            await store.complete_multipart(key, upload_id, [part])

    try:
        anyio.run(complete)
    except MlrunError as exc:
        return exc
    return None


def test_stale_uploads_are_aborted(dep: Deployment, client: httpx.Client) -> None:
    run_id = new_run(client, f"p{uuid.uuid4().hex[:8]}")
    stale = add_artifact(client, run_id, "stale.bin", finalize=False)
    recent = add_artifact(client, run_id, "recent.bin", finalize=False)
    multipart, stale_part = start_multipart(client, run_id, "big.bin")
    control, control_part = start_multipart(client, run_id, "control.bin")
    finalized = add_artifact(client, run_id, "kept.bin")
    assert [k for k in dep.objects() if stale in k]
    dep.pg("UPDATE artifacts SET created_at = now() - interval '25 hours'"
           " WHERE artifact_id = ANY(%s)", ([stale, multipart["artifact_id"], finalized],))
    deadline = time.monotonic() + JOB_DEADLINE_S
    while dep.pg("SELECT count(*) FROM artifacts WHERE artifact_id = %s", (stale,))[0][0]:
        assert time.monotonic() < deadline, "the stale upload was not aborted"
        time.sleep(0.2)  # bounded: pruning runs every housekeeping round
    rows = dict(dep.pg("SELECT artifact_id, status FROM artifacts WHERE run_id = %s", (run_id,)))
    assert rows == {recent: "pending", control["artifact_id"]: "pending",
                    finalized: "finalized"}
    assert not [k for k in dep.objects() if stale in k]
    assert [k for k in dep.objects() if recent in k]
    finalize = client.post(f"/api/v1/runs/{run_id}/artifacts/{stale}/finalize")
    assert finalize.status_code == 404 and error_code(finalize) == "artifact_not_found"
    # The stale multipart upload was aborted in S3 itself; one not aborted still completes.
    prefix = f"runs/{run_id}"
    assert complete_in_s3(dep, f"{prefix}/{multipart['artifact_id']}/big.bin",
                          multipart["multipart"]["upload_id"], stale_part) is not None
    assert complete_in_s3(dep, f"{prefix}/{control['artifact_id']}/control.bin",
                          control["multipart"]["upload_id"], control_part) is None


def test_a_server_killed_mid_purge_finishes_after_restart(
        postgres_server: Any, clickhouse_server: Any, s3_server: Any, tmp_path: Path) -> None:
    with deployment(postgres_server, clickhouse_server, s3_server, tmp_path) as killed:
        killed.env["MLRUN_PURGE_SETTLE_S"] = "0.5"
        server = killed.start(MLRUN_FAULT_INJECTION="kill_mid_purge")
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
            run_id = new_run(http, "crash")
            for start in range(0, 50_000, 25_000):
                seed(http, run_id, steps=25_000, start_step=start)
            add_artifact(http, run_id, "model.bin")
            job = http.delete(f"/api/v1/runs/{run_id}").json()
        assert server.process is not None
        assert server.process.wait(timeout=JOB_DEADLINE_S) == -9  # SIGKILLed mid-purge
        ((phase, state, attempts),) = killed.pg(
            "SELECT phase, state, attempts FROM purge_jobs WHERE job_id = %s", (job["job_id"],))
        assert (phase, state, attempts) == ("clickhouse", "running", 1)
        assert killed.pg_count("purge_runs", run_id) == 1

        restarted = killed.start(backend="asyncio")  # the housekeeper runs on asyncio too
        with httpx.Client(base_url=restarted.base_url, headers=AUTH, timeout=30) as http:
            done = wait_for_job(http, job["job_id"])
        assert done["attempts"] == 2 and done["points_removed"] >= 100_100
        assert sum(killed.ch_counts(run_id).values()) == 0
        assert sum(killed.pg_counts(run_id).values()) == 0
        assert not [k for k in killed.objects() if run_id in k]


def test_with_two_servers_one_purges_each_job(dep: Deployment, client: httpx.Client,
                                              tmp_path: Path) -> None:
    second = ServerProcess({**dep.env, "MLRUN_DATA_DIR": str(tmp_path / "data")},
                           tmp_path / "second.log")
    second.start()
    try:
        project = f"p{uuid.uuid4().hex[:8]}"
        run_ids = [new_run(client, project) for _ in range(4)]
        jobs = []
        for i, run_id in enumerate(run_ids):
            seed(client, run_id, steps=2000)
            url = dep.url if i % 2 else second.base_url
            deleted = httpx.delete(f"{url}/api/v1/runs/{run_id}", headers=AUTH, timeout=30)
            assert deleted.status_code == 202, deleted.text
            jobs.append(deleted.json()["job_id"])
        for job_id in jobs:
            done = wait_for_job(client, job_id)
            assert done["attempts"] == 1, done
        assert dep.server is not None
        logs = dep.server.log_text() + second.log_text()
        for job_id in jobs:
            assert logs.count(f"purge job {job_id} done") == 1
        workers = dep.pg("SELECT DISTINCT worker FROM purge_jobs WHERE job_id = ANY(%s)", (jobs,))
        assert workers and all(w for (w,) in workers)
        for run_id in run_ids:
            assert sum(dep.ch_counts(run_id).values()) == 0
    finally:
        assert second.stop(timeout_s=15) == 0


def test_local_store_partial_uploads_and_deleted_runs_leave_no_files(
        postgres_server: Any, clickhouse_server: Any, s3_server: Any, tmp_path: Path) -> None:
    with deployment(postgres_server, clickhouse_server, s3_server, tmp_path,
                    local_store=True) as local:
        server = local.start()
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
            run_id = new_run(http, "local")
            kept = add_artifact(http, run_id, "kept.bin")
            half = add_artifact(http, run_id, "half.bin", finalize=False)
            grant = http.post(f"/api/v1/runs/{run_id}/artifacts",
                              json={"name": "big.bin", "size_bytes": 64 * 1024 * 1024}).json()
            part = grant["multipart"]["parts"][0]
            put = httpx.put(part["url"], content=b"p" * grant["multipart"][
                "part_size_bytes"], headers=grant["required_headers"], timeout=60)
            assert put.status_code == 200, put.text
            partial = [k for k in local.objects() if not k.startswith("tmp/")]
            assert [k for k in partial if half in k] and len(partial) >= 3, partial
            local.pg("UPDATE artifacts SET created_at = now() - interval '25 hours'"
                     " WHERE artifact_id = ANY(%s)", ([half, grant["artifact_id"]],))
            deadline = time.monotonic() + JOB_DEADLINE_S
            while local.pg("SELECT count(*) FROM artifacts WHERE status = 'pending'")[0][0]:
                assert time.monotonic() < deadline, "stale uploads were not aborted"
                time.sleep(0.2)  # bounded: pruning runs every housekeeping round
            left = [k for k in local.objects() if not k.startswith("tmp/")]
            assert not [k for k in left if half in k or grant["artifact_id"] in k], left
            assert [k for k in left if kept in k]
            job = http.delete(f"/api/v1/runs/{run_id}").json()
            wait_for_job(http, job["job_id"])
        assert [k for k in local.objects() if not k.startswith("tmp/")] == []


@pytest.mark.parametrize(("now", "days", "oldest_kept"), [
    (datetime(2026, 3, 15, tzinfo=UTC), 30, 202602),   # February ends 28 days ago: kept
    (datetime(2026, 3, 15, tzinfo=UTC), 14, 202603),   # March 1 is 14 days ago: Feb goes
    (datetime(2026, 1, 10, tzinfo=UTC), 365, 202501),
])
def test_retention_keeps_every_month_that_ended_inside_the_window(
        now: datetime, days: int, oldest_kept: int) -> None:
    assert month_before(now, days) == oldest_kept


def test_a_server_killed_mid_retention_rebuilds_after_restart(
        postgres_server: Any, clickhouse_server: Any, s3_server: Any, tmp_path: Path) -> None:
    with deployment(postgres_server, clickhouse_server, s3_server, tmp_path) as killed:
        server = killed.start(MLRUN_FAULT_INJECTION="kill_mid_retention")
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as http:
            run_id = new_run(http, "retention-crash")
            seed(http, run_id, steps=500, start_step=500)  # recent points first: kept
            # The round after it drops the month and dies, perhaps before this answer left.
            with contextlib.suppress(httpx.TransportError):
                seed(http, run_id, steps=500, timestamp_ms=OLD_JAN_MS)
        assert server.process is not None
        assert server.process.wait(timeout=JOB_DEADLINE_S) == -9  # SIGKILLed mid-retention
        # Killed between the drop and the rebuild: the run is recorded for its rebuild, its
        # summary is gone (never one describing dropped points).
        assert killed.pg("SELECT run_id FROM retention_rebuilds") == [(run_id,)]
        assert killed.ch_counts(run_id)["metrics"] == 2 * 500  # two series: the recent ones
        assert killed.ch_counts(run_id)["metrics_summary"] == 0

        restarted = killed.start()
        with httpx.Client(base_url=restarted.base_url, headers=AUTH, timeout=30) as http:
            deadline = time.monotonic() + JOB_DEADLINE_S
            while killed.pg("SELECT count(*) FROM retention_rebuilds")[0][0]:
                assert time.monotonic() < deadline, "the rebuild did not resume"
                time.sleep(0.2)  # bounded: retention runs every housekeeping round
            summary = {m["name"]: m for m in http.get(f"/api/v1/runs/{run_id}").json()[
                "metrics_summary"]}
        assert {name: (m["count"], m["last_step"]) for name, m in summary.items()} == {
            "loss": (500, 999), "acc": (500, 999)}
        assert killed.ch.scalar(
            f"SELECT min(block) FROM metric_blocks WHERE run_id = '{run_id}'") == 500 // 128
