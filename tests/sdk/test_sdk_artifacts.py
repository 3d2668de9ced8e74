"""`Run.log_artifact` against a real `mlrun serve` on real PostgreSQL and ClickHouse, with
artifacts on real S3 (`rclone serve s3`) and on the server's local store (MINIO_ENDPOINT "").

Round trips are checked through the server's download URL (bytes hashed as they stream in),
never through the SDK's own view. The server switches to multipart above its threshold
(16 MiB, 8 MiB parts; not configurable at start-up), so the large file is 20 MiB + a tail.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import mlrun
from mlrun.sdk.artifacts import ArtifactUploadFailed
from mlrun.sdk.errors import InvalidArgument
from mlrun.sdk.settings import Settings

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture(params=["s3", "local"])
def server(request: pytest.FixtureRequest, server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    if request.param == "local":
        server_env.update(MINIO_ENDPOINT="", MINIO_ACCESS_KEY="", MINIO_SECRET_KEY="")
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def sdk_settings(server: ServerProcess, spool_dir: Path) -> Settings:
    return Settings.load(environ={}, server_url=server.base_url, api_key=TEST_API_KEY,
                         spool_dir=spool_dir, finish_timeout_s=120.0, request_timeout_s=30.0)


def write_random(path: Path, size_bytes: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as file:
        left = size_bytes
        while left:
            chunk = os.urandom(min(MiB, left))
            digest.update(chunk)
            file.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def downloaded_sha256(server: ServerProcess, run_id: str, artifact_id: str) -> tuple[int, str]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as api:
        answer = api.get(f"/api/v1/runs/{run_id}/artifacts/{artifact_id}/download")
        assert answer.status_code == 200, answer.text
        url = answer.json()["download_url"]
    digest = hashlib.sha256()
    size = 0
    with httpx.Client(timeout=60) as plain, plain.stream("GET", url) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def listed(server: ServerProcess, run_id: str) -> dict[str, dict[str, Any]]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as api:
        answer = api.get(f"/api/v1/runs/{run_id}/artifacts")
    assert answer.status_code == 200, answer.text
    return {a["name"]: a for a in answer.json()["artifacts"]}


def test_small_and_multipart_files_round_trip_byte_identical(
    server: ServerProcess, tmp_path: Path
) -> None:
    small, large = tmp_path / "metrics.json", tmp_path / "model.pt"
    small_sha = write_random(small, 100 * 1024 + 7)
    large_sha = write_random(large, 20 * MiB + 12345)
    run = mlrun.init("artifacts", settings=sdk_settings(server, tmp_path / "spool"))
    run.log({"loss": 1.0})
    first = run.log_artifact(small)  # returns at once; the worker thread uploads
    second = run.log_artifact(large, name="checkpoints/final.pt", type="model")
    assert second.total == large.stat().st_size
    run.finish(timeout_s=180)  # waits for both uploads

    for handle, sha, parts in ((first, small_sha, 1), (second, large_sha, 3)):
        assert handle.wait(0) is True and handle.state == "done", handle.error
        assert handle.bytes_sent == handle.total and handle.sha256 == sha
        assert handle.parts == parts
        assert handle.artifact_id is not None
        assert downloaded_sha256(server, run.run_id, handle.artifact_id) == (handle.total, sha)
    artifacts = listed(server, run.run_id)
    assert set(artifacts) == {"metrics.json", "checkpoints/final.pt"}
    assert artifacts["checkpoints/final.pt"]["type"] == "model"
    assert artifacts["metrics.json"]["mime_type"] == "application/json"
    assert artifacts["checkpoints/final.pt"]["sha256"] == large_sha


def test_finish_marks_the_run_finished_only_after_its_uploads_in_flight(
    server: ServerProcess, tmp_path: Path
) -> None:
    large = tmp_path / "weights.bin"
    sha = write_random(large, 20 * MiB + 1)
    run = mlrun.init("artifacts", settings=sdk_settings(server, tmp_path / "spool"))
    handle = run.log_artifact(large)  # not waited for: finish() must
    run.finish(timeout_s=180)
    assert handle.state == "done" and handle.sha256 == sha, handle.error
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as api:
        detail = api.get(f"/api/v1/runs/{run.run_id}").json()
    artifact = listed(server, run.run_id)["weights.bin"]
    assert detail["status"] == "finished" and detail["artifacts_count"] == 1
    # The status reached the server after the artifact was finalized, not while it uploaded.
    assert (datetime.fromisoformat(artifact["finalized_at"])
            <= datetime.fromisoformat(detail["finished_at"]))


def test_wait_true_blocks_until_finalized(server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    sha = write_random(path, 4096)
    with mlrun.init("artifacts", settings=sdk_settings(server, tmp_path / "spool")) as run:
        handle = mlrun.log_artifact(path, wait=True)
        assert handle.state == "done"  # before finish: wait=True returned only when finalized
        assert handle.artifact_id is not None
        assert downloaded_sha256(server, run.run_id, handle.artifact_id) == (4096, sha)


def test_a_refused_upload_is_reported_not_silent(
    server: ServerProcess, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "weights.bin"
    write_random(path, 1000)
    run = mlrun.init("artifacts", settings=sdk_settings(server, tmp_path / "spool"))
    with pytest.raises(InvalidArgument):
        run.log_artifact(tmp_path / "missing.bin")  # a caller's mistake: raised at the call
    with caplog.at_level(logging.WARNING, logger="mlrun.sdk"):
        handle = run.log_artifact(path, name="../outside/weights.bin")
        with pytest.raises(ArtifactUploadFailed) as failure:
            handle.wait(120)
    assert handle.state == "failed" and handle.error is failure.value
    assert failure.value.code == "invalid_argument", failure.value  # the server's code
    assert any(r.levelno == logging.ERROR and "invalid_argument" in r.getMessage()
               for r in caplog.records)

    # Uploads run one after another: the 20 MiB one keeps the worker busy while the second
    # file is deleted, so the second is gone by the time the worker reads it.
    big, doomed = tmp_path / "big.bin", tmp_path / "doomed.bin"
    write_random(big, 20 * MiB)
    write_random(doomed, 1000)
    ok = run.log_artifact(big)  # the uploader goes on after a failure
    lost = run.log_artifact(doomed)
    doomed.unlink()
    run.finish(timeout_s=120)
    assert ok.state == "done", ok.error
    assert lost.state == "failed" and lost.error is not None
    assert lost.error.code == "file_unreadable"
    with pytest.raises(ArtifactUploadFailed):
        lost.wait(0)
    assert set(listed(server, run.run_id)) == {"big.bin"}
