"""Artifacts end to end over HTTP: a real `mlrun serve` on real PostgreSQL and ClickHouse, with
artifacts on real S3 (`rclone serve s3`, real SigV4 checks, a bucket per test) and on the local
store (MINIO_ENDPOINT empty: the server serves its own signed URLs).

Bytes go where a client sends them: presigned (multipart) URLs with httpx, never through the
`/api/v1` routes. The server's peak RSS (VmHWM) is read before and after a 64 MiB round trip.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from mlrun.server.storage.objects.local_signing import LOCAL_ROUTE_PREFIX, sign_local

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(300)

MiB = 1024 * 1024
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process (VmHWM in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM line")


@pytest.fixture(params=["s3", "local"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def server(store_kind: str, server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    if store_kind == "local":
        server_env.update(MINIO_ENDPOINT="", MINIO_ACCESS_KEY="", MINIO_SECRET_KEY="")
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process
    assert TEST_API_KEY not in process.log_text()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as http:
        yield http


@pytest.fixture
def uploader() -> Iterator[httpx.Client]:
    """A plain client for presigned URLs: no API key, like any S3 client."""
    with httpx.Client(timeout=120) as http:
        yield http


def new_run(client: httpx.Client, project: str = "vision") -> str:
    response = client.post("/api/v1/runs", json={"project": project})
    assert response.status_code == 201, response.text
    run_id: str = response.json()["run_id"]
    return run_id


def create(client: httpx.Client, run_id: str, **payload: Any) -> dict[str, Any]:
    response = client.post(f"/api/v1/runs/{run_id}/artifacts", json=payload)
    assert response.status_code == 201, response.text
    grant: dict[str, Any] = response.json()
    return grant


def put_single(uploader: httpx.Client, grant: dict[str, Any], data: bytes) -> None:
    assert grant["multipart"] is None and grant["upload_url"]
    response = uploader.put(grant["upload_url"], content=data,
                            headers=grant["required_headers"])
    assert response.status_code == 200, response.text


def finalize(client: httpx.Client, run_id: str, artifact_id: str,
             parts: list[dict[str, Any]] | None = None) -> httpx.Response:
    body = {"parts": parts} if parts is not None else None
    return client.post(f"/api/v1/runs/{run_id}/artifacts/{artifact_id}/finalize", json=body)


def artifact_rows(server_env: dict[str, str], run_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(server_env["DATABASE_URL"]) as conn:
        rows = conn.execute("SELECT artifact_id, status FROM artifacts WHERE run_id = %s",
                            (run_id,)).fetchall()
    return [(artifact_id, status) for artifact_id, status in rows]


def test_64_mib_multipart_round_trip_without_growing_the_server(
    store_kind: str, server: ServerProcess, client: httpx.Client, uploader: httpx.Client
) -> None:
    data = os.urandom(64 * MiB)
    digest = hashlib.sha256(data).hexdigest()
    run_id = new_run(client)
    hwm_before = vm_hwm_bytes(server.pid)

    grant = create(client, run_id, name="checkpoints/epoch 3/model.pt", type="model",
                   size_bytes=len(data), sha256=digest.upper(), mime_type="application/x-torch")
    assert grant["upload_url"] is None
    multipart = grant["multipart"]
    part_size = multipart["part_size_bytes"]
    assert part_size >= 5 * MiB and len(multipart["parts"]) == -(-len(data) // part_size) > 1
    view = memoryview(data)
    parts = []
    for part in multipart["parts"]:
        number = part["part_number"]
        part_bytes = bytes(view[(number - 1) * part_size : number * part_size])
        response = uploader.put(part["url"], content=part_bytes,
                                headers=grant["required_headers"])
        assert response.status_code == 200, response.text
        parts.append({"part_number": number, "etag": response.headers["etag"]})

    finalized = finalize(client, run_id, grant["artifact_id"], parts)
    assert finalized.status_code == 200, finalized.text
    artifact = finalized.json()
    assert artifact["status"] == "finalized"
    assert (artifact["size_bytes"], artifact["sha256"]) == (len(data), digest)
    again = finalize(client, run_id, grant["artifact_id"], parts)  # idempotent
    assert again.status_code == 200 and again.json() == artifact

    listed = client.get(f"/api/v1/runs/{run_id}/artifacts").json()["artifacts"]
    assert listed == [artifact]
    assert artifact["name"] == "checkpoints/epoch 3/model.pt"
    assert (artifact["type"], artifact["mime_type"]) == ("model", "application/x-torch")

    download = client.get(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download")
    assert download.status_code == 200, download.text
    assert download.json()["size_bytes"] == len(data)
    hasher, received = hashlib.sha256(), 0
    with uploader.stream("GET", download.json()["download_url"]) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            hasher.update(chunk)
            received += len(chunk)
    assert (received, hasher.hexdigest()) == (len(data), digest)

    growth = vm_hwm_bytes(server.pid) - hwm_before
    print(f"{store_kind}: server VmHWM grew by {growth / MiB:.1f} MiB for a 64 MiB round trip")
    assert growth < 16 * MiB, f"server peak RSS grew by {growth / MiB:.1f} MiB"


def test_single_put_round_trip_and_size_unknown(
    client: httpx.Client, uploader: httpx.Client
) -> None:
    run_id = new_run(client)
    data = b"accuracy,0.93\n" * 1000
    grant = create(client, run_id, name="metrics.csv", mime_type="text/csv")
    put_single(uploader, grant, data)
    artifact = finalize(client, run_id, grant["artifact_id"]).json()
    assert (artifact["size_bytes"], artifact["sha256"]) == (len(data), None)
    url = client.get(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download")
    assert uploader.get(url.json()["download_url"]).content == data

    empty = create(client, run_id, name="empty", size_bytes=0)
    put_single(uploader, empty, b"")
    assert finalize(client, run_id, empty["artifact_id"]).json()["size_bytes"] == 0
    names = [a["name"] for a in client.get(f"/api/v1/runs/{run_id}/artifacts").json()["artifacts"]]
    assert names == ["metrics.csv", "empty"]


def test_a_finalized_artifact_cannot_be_overwritten_through_its_upload_url(
    client: httpx.Client, uploader: httpx.Client
) -> None:
    """The probe replaced a finalized 5-byte artifact with 5,000,000 bytes through its
    still-valid upload URL. Now that URL reaches only a staging object nothing reads."""
    run_id = new_run(client)
    grant = create(client, run_id, name="model.bin")
    put_single(uploader, grant, b"trust")
    finalized = finalize(client, run_id, grant["artifact_id"])
    assert finalized.status_code == 200, finalized.text
    # The same URL, within its hour, after finalize: whatever the store answers...
    uploader.put(grant["upload_url"], content=b"x" * 5_000_000,
                 headers=grant["required_headers"])
    # ...the artifact is the finalized one, as finalize, listing and download all say.
    again = finalize(client, run_id, grant["artifact_id"])
    assert again.status_code == 200 and again.json() == finalized.json()
    assert again.json()["size_bytes"] == 5
    listed = client.get(f"/api/v1/runs/{run_id}/artifacts").json()["artifacts"]
    assert [a["size_bytes"] for a in listed] == [5]
    url = client.get(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download")
    assert uploader.get(url.json()["download_url"]).content == b"trust"


def test_finalize_again_reverifies_the_stored_object(
    server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    uploader: httpx.Client,
) -> None:
    """A finalized artifact whose object was changed in the store itself (here: its file in
    the local store) is reported, not vouched for: 409 `artifact_modified`."""
    server_env.update(MINIO_ENDPOINT="", MINIO_ACCESS_KEY="", MINIO_SECRET_KEY="",
                      MLRUN_DATA_DIR=str(tmp_path / "data"))
    with clean_server(server_env, tmp_path / "server.log", servers) as process, \
            httpx.Client(base_url=process.base_url, headers=AUTH, timeout=60) as client:
        run_id = new_run(client)
        grant = create(client, run_id, name="model.bin")
        put_single(uploader, grant, b"trust")
        assert finalize(client, run_id, grant["artifact_id"]).status_code == 200
        [stored] = (tmp_path / "data").rglob(f"runs/{run_id}/{grant['artifact_id']}/model.bin")
        stored.write_bytes(b"swapped in the store")
        again = finalize(client, run_id, grant["artifact_id"])
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "artifact_modified"


def test_refused_finalize_records_nothing(
    client: httpx.Client, uploader: httpx.Client, server_env: dict[str, str]
) -> None:
    run_id = new_run(client)
    data = b"0123456789"

    missing = create(client, run_id, name="missing.bin", size_bytes=len(data))
    response = finalize(client, run_id, missing["artifact_id"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "object_missing"

    wrong_size = create(client, run_id, name="size.bin", size_bytes=len(data))
    put_single(uploader, wrong_size, data + b"!")
    response = finalize(client, run_id, wrong_size["artifact_id"])
    assert response.status_code == 409 and response.json()["error"]["code"] == "size_mismatch"
    assert "11 bytes" in response.json()["error"]["message"]

    wrong_sum = create(client, run_id, name="sum.bin", size_bytes=len(data),
                       sha256=hashlib.sha256(b"something else").hexdigest())
    put_single(uploader, wrong_sum, data)
    response = finalize(client, run_id, wrong_sum["artifact_id"])
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "checksum_mismatch"

    big = create(client, run_id, name="parts.bin", size_bytes=40 * MiB)
    response = finalize(client, run_id, big["artifact_id"])
    assert response.status_code == 400 and response.json()["error"]["code"] == "parts_required"
    response = finalize(client, run_id, big["artifact_id"],
                        [{"part_number": 1, "etag": '"0000"'}])
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_parts"

    assert client.get(f"/api/v1/runs/{run_id}/artifacts").json() == {"artifacts": []}
    assert {status for _, status in artifact_rows(server_env, run_id)} == {"pending"}
    for grant in (missing, wrong_size, wrong_sum):
        response = client.get(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download")
        assert response.status_code == 409
        assert response.json()["error"]["code"] == "artifact_not_finalized"

    # A refused upload can be fixed through the same URL, or abandoned.
    put_single(uploader, wrong_size, data)
    assert finalize(client, run_id, wrong_size["artifact_id"]).status_code == 200
    for grant in (missing, wrong_sum, big):
        response = client.post(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/abort")
        assert response.status_code == 200, response.text
    response = client.post(f"/api/v1/runs/{run_id}/artifacts/{wrong_size['artifact_id']}/abort")
    assert response.status_code == 409
    assert artifact_rows(server_env, run_id) == [(wrong_size["artifact_id"], "finalized")]
    gone = uploader.get(client.get(
        f"/api/v1/runs/{run_id}/artifacts/{wrong_size['artifact_id']}/download"
    ).json()["download_url"])
    assert gone.content == data


@pytest.mark.parametrize("name", [
    "../escape", "a/../../b", "/etc/passwd", "a//b", "dir/", "a\\b", "nul\x00byte", ".",
    "x" * 1025, "ok/" + "y" * 256,
])
def test_unsafe_names_are_refused(client: httpx.Client, name: str) -> None:
    run_id = new_run(client)
    response = client.post(f"/api/v1/runs/{run_id}/artifacts", json={"name": name})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "name"


def test_unknown_run_artifact_and_bad_ids(client: httpx.Client) -> None:
    response = client.post("/api/v1/runs/nope/artifacts", json={"name": "a"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "run_not_found"
    assert client.get("/api/v1/runs/nope/artifacts").status_code == 404
    run_id = new_run(client)
    unknown = uuid.uuid4().hex
    for path in (f"{unknown}/download", f"{unknown}/finalize", f"{unknown}/abort"):
        method = "GET" if path.endswith("download") else "POST"
        response = client.request(method, f"/api/v1/runs/{run_id}/artifacts/{path}")
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "artifact_not_found"
    response = client.get(f"/api/v1/runs/{run_id}/artifacts/NOT-AN-ID/download")
    assert response.status_code == 400 and response.json()["error"]["field"] == "artifact_id"


def _tamper(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    path = changes.pop("path", parts.path)
    query.update(changes)
    return urlunsplit(parts._replace(path=path, query=urlencode(query)))


def test_tampered_and_expired_urls_are_refused_by_the_store(
    store_kind: str, server: ServerProcess, server_env: dict[str, str], client: httpx.Client,
    uploader: httpx.Client,
) -> None:
    run_id = new_run(client)
    grant = create(client, run_id, name="a.bin", size_bytes=4)
    url = grant["upload_url"]
    if store_kind == "s3":
        tampered = [_tamper(url, **{"X-Amz-Signature": "0" * 64}),
                    _tamper(url, path=urlsplit(url).path + "x"),
                    _tamper(url, **{"X-Amz-Expires": "604800"})]
    else:
        signature = dict(parse_qsl(urlsplit(url).query))["signature"]
        tampered = [_tamper(url, signature="0" * 64),
                    _tamper(url, signature=signature.upper()),
                    _tamper(url, path=urlsplit(url).path + "x"),
                    _tamper(url, expires=str(int(time.time()) + 99_999))]
    for bad in tampered:
        response = uploader.put(bad, content=b"evil")
        assert response.status_code == 403, (bad, response.status_code, response.text)
    put_single(uploader, grant, b"good")
    assert finalize(client, run_id, grant["artifact_id"]).status_code == 200
    download_url = client.get(
        f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download").json()["download_url"]
    assert uploader.get(download_url).content == b"good"
    # A GET URL does not allow a PUT (the method is signed too).
    assert uploader.put(download_url, content=b"evil").status_code == 403
    assert uploader.get(download_url).content == b"good"

    if store_kind == "local":
        # Sign a URL for the server's own store that expired a second ago.
        secret = (Path(server_env["MLRUN_DATA_DIR"]) / "local-artifacts.key").read_bytes()
        key = urlsplit(download_url).path[len(LOCAL_ROUTE_PREFIX):]
        expired_at = int(time.time()) - 1
        query = urlencode({"expires": expired_at, "signature": sign_local(
            signing_secret=secret, method="GET", key=key, expires_at_s=expired_at)})
        expired = f"{server.base_url}{LOCAL_ROUTE_PREFIX}{key}?{query}"
        response = uploader.get(expired)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "invalid_signature"
        # The same signing with a future expiry works: what was refused is the expiry.
        fresh_at = int(time.time()) + 60
        query = urlencode({"expires": fresh_at, "signature": sign_local(
            signing_secret=secret, method="GET", key=key, expires_at_s=fresh_at)})
        assert uploader.get(f"{server.base_url}{LOCAL_ROUTE_PREFIX}{key}?{query}").content == (
            b"good")
    else:
        # rclone checks the expiry of a presigned URL; build one that lives one second.
        from datetime import UTC, datetime

        from mlrun.server.protocols import s3 as s3proto

        key = urlsplit(download_url).path.split("/", 2)[2]
        bucket = server_env["MINIO_BUCKET"]
        credentials = s3proto.Credentials(server_env["MINIO_ACCESS_KEY"],
                                          server_env["MINIO_SECRET_KEY"])
        short = s3proto.presign_url(
            method="GET", url=s3proto.object_url(server_env["MINIO_ENDPOINT"], bucket,
                                                 httpx.URL("/" + key).path[1:]),
            credentials=credentials, now=datetime.now(UTC), expires_s=1)
        assert uploader.get(short).content == b"good"
        time.sleep(2.1)  # let the URL's one-second lifetime run out
        assert uploader.get(short).status_code in (400, 403)  # rclone: 400 AccessDenied


def test_keys_and_the_local_store_on_asyncio(
    server_env: dict[str, str], tmp_path: Path, servers: list[ServerProcess],
    uploader: httpx.Client,
) -> None:
    """The same server on the asyncio backend: key refresh, streamed local uploads and
    downloads, disconnect handling all run on anyio only."""
    server_env.update(MINIO_ENDPOINT="", MINIO_ACCESS_KEY="", MINIO_SECRET_KEY="")
    process = ServerProcess(server_env, tmp_path / "asyncio.log", backend="asyncio")
    servers.append(process)
    process.start()
    with httpx.Client(base_url=process.base_url, headers=AUTH, timeout=60) as admin:
        admin.post("/api/v1/projects", json={"name": "vision"})  # a key's project must exist
        created = admin.post("/api/v1/keys", json={"name": "a", "scopes": ["read", "write"],
                                                   "project": "vision"})
        assert created.status_code == 201
    with httpx.Client(base_url=process.base_url, timeout=60,
                      headers={"X-API-Key": created.json()["key"]}) as client:
        run_id = new_run(client)
        data = os.urandom(3 * MiB + 1)
        grant = create(client, run_id, name="a/b.bin", size_bytes=len(data),
                       sha256=hashlib.sha256(data).hexdigest())
        put_single(uploader, grant, data)
        assert finalize(client, run_id, grant["artifact_id"]).status_code == 200
        url = client.get(f"/api/v1/runs/{run_id}/artifacts/{grant['artifact_id']}/download")
        assert uploader.get(url.json()["download_url"]).content == data
        assert uploader.get(url.json()["download_url"] + "0").status_code == 403
    assert process.stop() == 0, process.log_text()[-3000:]
    assert "Traceback" not in process.log_text()
