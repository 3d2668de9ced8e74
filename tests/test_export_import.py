"""`mlrun export` / `mlrun import` end to end on real PostgreSQL, ClickHouse 18.16 and S3: runs
written through the API of one deployment, exported by the command line, imported into a second
deployment (its own PostgreSQL and ClickHouse databases), and read back through every read
route of both servers, which must answer identically. Importing twice stores nothing twice;
a truncated, edited or foreign file, or a run id the target already uses, is refused before
anything is written.

One source server and one target server per module (start-up costs seconds); the commands run
as child processes, the way an operator runs them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from backends.postgres import fresh_database
from readback import ClickHouseReader
from server_process import TEST_API_KEY, ServerProcess, real_backend_env

pytestmark = pytest.mark.timeout(240)

AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
T0_MS = 1_700_000_000_000
PROJECT = "transfer"
STEPS = 3000  # 24 blocks of 128: whole-series reads are bucketed from the rollups
_COMMAND_TIMEOUT_S = 120


@dataclass
class Deployment:
    env: dict[str, str]
    clickhouse: ClickHouseReader

    def run_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlrun", *args],
                              env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=_COMMAND_TIMEOUT_S, check=False)

    def pg_scalar(self, sql: str) -> Any:
        with psycopg.connect(self.env["DATABASE_URL"]) as conn:
            row = conn.execute(sql).fetchone()
            assert row is not None
            return row[0]


def deployment_env(dsn: str, clickhouse_server: Any, s3_server: Any, bucket: str,
                   data_dir: Path) -> dict[str, str]:
    return {
        "API_HOST": "127.0.0.1",
        "API_HTTP_PORT": "0",
        "API_GRPC_PORT": "0",
        "MLRUN_API_KEY": TEST_API_KEY,
        **real_backend_env(database_url=dsn, clickhouse=clickhouse_server,
                           clickhouse_database=f"test_{uuid.uuid4().hex[:16]}", s3=s3_server,
                           bucket=bucket),
        "MLRUN_STARTUP_TIMEOUT_S": "30",
        "MLRUN_DATA_DIR": str(data_dir),
    }


@pytest.fixture(scope="module")
def deployments(postgres_server: Any, clickhouse_server: Any, s3_server: Any,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Deployment]]:
    """Three deployments on the same servers, each with its own databases; the artifact bucket
    is shared (S3 is backed up natively; the file carries the manifest)."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    root = tmp_path_factory.mktemp("transfer")
    with fresh_database(postgres_server.dsn()) as a, fresh_database(postgres_server.dsn()) as b, \
            fresh_database(postgres_server.dsn()) as c:
        found = []
        for index, dsn in enumerate((a, b, c)):
            env = deployment_env(dsn, clickhouse_server, s3_server, bucket, root / f"d{index}")
            found.append(Deployment(env, ClickHouseReader(clickhouse_server,
                                                          env["CLICKHOUSE_DATABASE"])))
        yield found


def start_server(env: dict[str, str], log_path: Path) -> ServerProcess:
    process = ServerProcess(env, log_path)
    try:
        process.start()
    except BaseException:
        process.kill()
        raise
    return process


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def seed(client: httpx.Client) -> list[str]:
    """Two runs of PROJECT (one finished with a rewritten range, system metrics and an
    artifact; one still running) and one run of another project."""
    run_a, run_b, run_other = (f"r-{uuid.uuid4().hex[:8]}" for _ in range(3))
    ok(client.post("/api/v1/runs", json={"project": PROJECT, "run_id": run_a, "name": "alpha",
                                         "config": {"lr": 0.001, "opt": "adam"},
                                         "tags": {"team": "vision"}}), 201)
    ok(client.post("/api/v1/runs", json={"project": PROJECT, "run_id": run_b, "name": "beta",
                                         "config": {"lr": 0.01}}), 201)
    ok(client.post("/api/v1/runs", json={"project": "elsewhere", "run_id": run_other}), 201)
    steps = list(range(STEPS))
    ok(client.post("/api/v1/ingest/batch", json={
        "run_id": run_a, "batch_id": "a-1",
        "series": [
            {"name": "train/loss", "steps": steps,
             "values": [1.0 / (s + 1) + (5.0 if s == 1234 else 0.0) for s in steps],
             "timestamps": [T0_MS + s * 10 for s in steps]},
            {"name": "val/acc", "steps": steps[::3], "values": [s / STEPS for s in steps[::3]],
             "timestamps": [T0_MS + s * 10 for s in steps[::3]]},
        ],
        "system_metrics": [{"name": "cpu", "value": 10.0 + i % 7, "step": i,
                            "timestamp": T0_MS + i * 500}
                           for i in range(60)],
    }))
    # A rewrite of steps 100-199: a dirty range, and a summary that remembers the old values.
    ok(client.post("/api/v1/ingest/batch", json={
        "run_id": run_a, "batch_id": "a-2",
        "series": [{"name": "train/loss", "steps": steps[100:200],
                    "values": [-2.0 + s / 1000 for s in steps[100:200]],
                    "timestamps": [T0_MS + 50_000 + s for s in steps[100:200]]}],
        "params": {"epochs": 3}, "tags": {"stage": "baseline"},
    }))
    ok(client.post("/api/v1/ingest/batch", json={
        "run_id": run_b, "batch_id": "b-1",
        "series": [{"name": "train/loss", "steps": steps[:700],
                    "values": [2.0 / (s + 1) for s in steps[:700]]}],
    }))
    ok(client.post("/api/v1/ingest/batch", json={
        "run_id": run_other, "batch_id": "o-1",
        "metrics": [{"name": "loss", "value": 1.0, "step": 0}]}))
    data = os.urandom(3000)
    grant = ok(client.post(f"/api/v1/runs/{run_a}/artifacts", json={
        "name": "models/best.bin", "type": "model", "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest()}), 201)
    with httpx.Client(timeout=30) as uploader:
        put = uploader.put(grant["upload_url"], content=data, headers=grant["required_headers"])
        assert put.status_code == 200, put.text
    ok(client.post(f"/api/v1/runs/{run_a}/artifacts/{grant['artifact_id']}/finalize"))
    ok(client.post(f"/api/v1/runs/{run_a}/finish", json={"status": "finished"}))
    return [run_a, run_b, run_other]


def answers(client: httpx.Client, run_ids: list[str]) -> dict[str, Any]:
    """Every read route's answer about `run_ids` (run, summaries, listing, raw and downsampled
    series, system metrics, compare, artifacts)."""
    found: dict[str, Any] = {
        "listing": ok(client.get("/api/v1/runs", params={"project": PROJECT,
                                                          "include_total": "true"})),
        "filtered": ok(client.get("/api/v1/runs", params={"tags": "team=vision",
                                                           "params": "lr<=0.005"})),
        "compare": ok(client.post("/api/v1/runs/compare", json={
            "run_ids": run_ids, "max_points": 50, "alignment": "relative_time"})),
        "compare_minmax": ok(client.post("/api/v1/runs/compare", json={
            "run_ids": run_ids, "metric_names": ["train/loss"], "method": "minmax",
            "max_points": 30})),
    }
    for run_id in run_ids:
        found[run_id] = {
            "run": ok(client.get(f"/api/v1/runs/{run_id}")),
            "raw": ok(client.get(f"/api/v1/runs/{run_id}/metrics",
                                 params={"method": "raw", "max_points": 100_000})),
            "lttb": ok(client.get(f"/api/v1/runs/{run_id}/metrics", params={"max_points": 40})),
            "blocks": ok(client.get(f"/api/v1/runs/{run_id}/metrics",
                                    params={"method": "minmax", "max_points": 12})),
            "avg_range": ok(client.get(f"/api/v1/runs/{run_id}/metrics", params={
                "method": "avg", "max_points": 20, "start_step": 90, "end_step": 1500})),
            "system": ok(client.get(f"/api/v1/runs/{run_id}/system_metrics",
                                    params={"max_points": 20})),
            "artifacts": ok(client.get(f"/api/v1/runs/{run_id}/artifacts")),
        }
    return found


@dataclass
class Transfer:
    source: Deployment
    target: Deployment
    spare: Deployment
    run_ids: list[str]
    other_run: str
    file: Path
    source_answers: dict[str, Any]
    target_answers: dict[str, Any]
    first_import: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def transfer(deployments: list[Deployment], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Transfer]:
    source, target, spare = deployments
    logs = tmp_path_factory.mktemp("transfer-logs")
    server = start_server(source.env, logs / "source.log")
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
            *run_ids, other = seed(client)
            source_answers = answers(client, run_ids)
    finally:
        assert server.stop() == 0, server.log_text()[-3000:]
    export_file = logs / "transfer.mlrun.jsonl.gz"
    exported = source.run_command("export", "--project", PROJECT, "-o", str(export_file))
    assert exported.returncode == 0, exported.stderr
    imported = target.run_command("import", str(export_file))
    assert imported.returncode == 0, imported.stderr
    server = start_server(target.env, logs / "target.log")
    try:
        with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as client:
            target_answers = answers(client, run_ids)
    finally:
        assert server.stop() == 0, server.log_text()[-3000:]
    yield Transfer(source, target, spare, run_ids, other, export_file, source_answers,
                   target_answers, imported)


def test_every_read_route_answers_the_same_after_export_and_import(transfer: Transfer) -> None:
    source, target = transfer.source_answers, transfer.target_answers
    assert source.keys() == target.keys()
    for route in source:
        assert target[route] == source[route], route
    # The seeded data is really in the answers compared (not two empty answers).
    run_a, run_b = transfer.run_ids
    assert source["listing"]["total"] == 2
    assert source[run_b]["run"]["status"] == "running"
    assert [run["run_id"] for run in source["filtered"]["runs"]] == [run_a]
    detail = source[run_a]["run"]
    assert detail["status"] == "finished" and detail["params"]["epochs"] == "3"
    loss = next(s for s in detail["metrics_summary"] if s["name"] == "train/loss")
    assert loss["min"] < -1.8 and loss["count"] == STEPS  # the rewrite's value, steps once
    raw = {s["name"]: s for s in source[run_a]["raw"]["series"]}
    assert raw["train/loss"]["total_points"] == STEPS
    assert raw["train/loss"]["points"][150]["value"] == pytest.approx(-2.0 + 0.15)
    assert any(p["value"] > 5 for p in
               next(s for s in source[run_a]["blocks"]["series"]
                    if s["name"] == "train/loss")["points"])  # the spike survives minmax
    assert len(source[run_a]["system"]["series"][0]["points"]) > 0
    assert [a["name"] for a in source[run_a]["artifacts"]["artifacts"]] == ["models/best.bin"]
    assert "imported 2 runs" in transfer.first_import.stdout


def test_the_export_selects_by_filter_and_leaves_other_projects_out(transfer: Transfer) -> None:
    assert transfer.target.pg_scalar(
        f"SELECT count(*) FROM runs WHERE run_id = '{transfer.other_run}'") == 0
    assert transfer.target.clickhouse.scalar(
        f"SELECT count() FROM metrics WHERE run_id = '{transfer.other_run}'") == 0
    with gzip.open(transfer.file, "rt") as lines:
        header = lines.readline()
    assert '"format":"mlrun-export"' in header and '"project":"transfer"' in header


def stored_counts(deployment: Deployment, run_ids: list[str]) -> tuple[Any, ...]:
    quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
    ch = deployment.clickhouse
    return (
        deployment.pg_scalar("SELECT count(*) FROM runs"),
        deployment.pg_scalar("SELECT count(*) FROM run_params"),
        deployment.pg_scalar("SELECT count(*) FROM artifacts"),
        ch.scalar(f"SELECT count() FROM metrics WHERE run_id IN ({quoted})"),
        ch.scalar(f"SELECT count() FROM system_metrics WHERE run_id IN ({quoted})"),
        ch.scalar(f"SELECT count() FROM metrics_summary WHERE run_id IN ({quoted})"),
        ch.scalar(f"SELECT count() FROM metric_blocks WHERE run_id IN ({quoted})"),
    )


def test_importing_twice_stores_nothing_twice(transfer: Transfer) -> None:
    before = stored_counts(transfer.target, transfer.run_ids)
    assert before[0] == 2 and before[3] > 0
    again = transfer.target.run_command("import", str(transfer.file))
    assert again.returncode == 0, again.stderr
    assert "imported 0 runs, skipped 2 already imported" in again.stdout
    assert stored_counts(transfer.target, transfer.run_ids) == before


def nothing_imported(deployment: Deployment, run_ids: list[str]) -> None:
    """The spare deployment has no run at all, and ClickHouse no point of these runs."""
    result = deployment.run_command("import", "--help")  # creates nothing, but proves the CLI
    assert result.returncode == 0
    try:
        runs = deployment.pg_scalar("SELECT count(*) FROM runs")
    except psycopg.errors.UndefinedTable:
        runs = 0
    assert runs == 0
    quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
    try:
        points = deployment.clickhouse.scalar(
            f"SELECT count() FROM metrics WHERE run_id IN ({quoted})")
    except httpx.HTTPStatusError:  # no table yet: nothing could have been written
        points = 0
    assert points == 0


def rewrite(path: Path, target: Path, *, keep_lines: int | None = None,
            edit: tuple[str, str] | None = None) -> Path:
    with gzip.open(path, "rb") as source:
        lines = source.readlines()
    if keep_lines is not None:
        lines = lines[:keep_lines]
    if edit is not None:
        index = next(i for i, line in enumerate(lines) if edit[0].encode() in line)
        lines[index] = lines[index].replace(edit[0].encode(), edit[1].encode(), 1)
    with gzip.open(target, "wb") as out:
        out.writelines(lines)
    return target


@pytest.mark.parametrize("damage", ["cut_bytes", "cut_lines", "edited", "foreign_json",
                                    "not_gzip", "newer_version"])
def test_a_damaged_or_foreign_file_is_refused_and_nothing_is_imported(
        transfer: Transfer, damage: str, tmp_path: Path) -> None:
    whole = transfer.file.read_bytes()
    bad = tmp_path / "bad.gz"
    expected = {
        "cut_bytes": "truncated", "cut_lines": "truncated", "edited": "do not match",
        "foreign_json": "not an MLRun export file", "not_gzip": "not gzip-compressed",
        "newer_version": "format version 99 is not supported",
    }[damage]
    if damage == "cut_bytes":
        bad.write_bytes(whole[: len(whole) * 2 // 3])
    elif damage == "cut_lines":
        with gzip.open(transfer.file, "rb") as source:
            count = len(source.readlines())
        rewrite(transfer.file, bad, keep_lines=count - 3)  # the last run's end is missing
    elif damage == "edited":
        rewrite(transfer.file, bad, edit=('"status":"finished"', '"status":"killed"'))
    elif damage == "foreign_json":
        with gzip.open(bad, "wb") as out:
            out.write(b'{"kind": "header", "format": "something-else"}\n{"a": 1}\n')
    elif damage == "not_gzip":
        bad.write_bytes(b"run_id,step,value\nr1,0,0.5\n")
    else:
        rewrite(transfer.file, bad, edit=('"format_version":1', '"format_version":99'))
    result = transfer.spare.run_command("import", str(bad))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    nothing_imported(transfer.spare, transfer.run_ids)


def test_a_run_id_the_target_uses_for_another_run_is_refused_before_anything_is_written(
        transfer: Transfer) -> None:
    # The source deployment holds runs of these ids that were not imported.
    before = stored_counts(transfer.source, transfer.run_ids)
    result = transfer.source.run_command("import", str(transfer.file))
    assert result.returncode == 2, result.stderr
    assert "exist in the target with other content" in result.stderr
    assert "nothing was imported" in result.stderr
    assert stored_counts(transfer.source, transfer.run_ids) == before
