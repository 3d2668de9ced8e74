"""Many servers, one deployment: two real `mlrun serve` processes (plus, in queued mode, a
`mlrun process`) on one PostgreSQL, ClickHouse and Redis, in direct and in queued mode.

Nothing correctness-relevant may live in one process's memory, so each check makes the two
servers race for one piece of shared state:
- the three processes start at the same moment on fresh databases: every migration is recorded
  once, in PostgreSQL and in ClickHouse;
- eight clients, half on each server, add new metric names and tag keys to one run (and one
  project) at the same moment: the per-run and per-project limits hold exactly, every dropped
  name is reported in a warning, and ClickHouse holds the admitted names' points and nothing of
  the dropped ones;
- the same batch sent to both servers at once is stored once;
- a key revoked on one server is refused by the other within the documented ~2 s (one reload).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ingest_load import AUTH, batch_body
from readback import ClickHouseReader
from server_process import TEST_API_KEY, ProcessorProcess, ServerProcess

pytestmark = pytest.mark.timeout(240)

MAX_NAMES, MAX_RUN_TAGS, MAX_PROJECT_TAGS = 10, 5, 8
CLIENTS, ROUNDS, NAMES_PER_BATCH, STEPS = 8, 3, 2, 5
# Keys are reloaded every 2 s; a reload takes milliseconds, the rest is a loaded 2-core box.
REVOCATION_BOUND_S = 3.0


@pytest.fixture(params=["direct", "queued"])
def mode(request: pytest.FixtureRequest) -> str:
    value: str = request.param
    return value


@pytest.fixture
def deployment_env(server_env: dict[str, str], mode: str, request: pytest.FixtureRequest
                   ) -> dict[str, str]:
    env = {**server_env, "MLRUN_MAX_METRIC_NAMES_PER_RUN": str(MAX_NAMES),
           "MLRUN_MAX_TAG_KEYS_PER_RUN": str(MAX_RUN_TAGS),
           "MLRUN_MAX_TAGS_PER_PROJECT": str(MAX_PROJECT_TAGS)}
    if mode == "queued":
        redis = request.getfixturevalue("redis_server")
        env.update({"INGEST_MODE": "queued", "REDIS_URL": redis.url,
                    "MLRUN_QUEUE_STREAM": f"test-{uuid.uuid4().hex[:8]}",
                    "MLRUN_QUEUE_PARTITIONS": "2", "PROCESSOR_HTTP_PORT": "0"})
    return env


def start_together(processes: list[ServerProcess]) -> None:
    """Start every process before waiting for any, so their migrations really overlap."""
    failures: list[BaseException] = []

    def start(process: ServerProcess) -> None:
        try:
            process.start(timeout_s=90)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start, args=(p,)) for p in processes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run the calls in threads released by one barrier; their answers in call order."""
    barrier = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait(timeout=20)
        answers[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(answer is not None for answer in answers), "a call did not return"
    return [answer for answer in answers if answer is not None]


def post(http: httpx.Client, url: str, body: dict[str, Any] | bytes) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(url, content=body)
    return http.post(url, json=body)


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)  # observing other processes: there is no event to wait on


def test_two_servers_share_migrations_cardinality_ledger_and_keys(
    mode: str, deployment_env: dict[str, str], servers: list[ServerProcess], tmp_path: Path,
    clickhouse_reader: ClickHouseReader,
) -> None:
    env = deployment_env
    pair = [ServerProcess({**env, "MLRUN_DATA_DIR": str(tmp_path / f"data-{name}")},
                          tmp_path / f"server-{name}.log") for name in "ab"]
    processes: list[ServerProcess] = list(pair)
    if mode == "queued":
        processes.append(ProcessorProcess(env, tmp_path / "processor.log"))
    servers.extend(processes)
    start_together(processes)

    # --- migrations ran once, though three processes applied them at the same moment ----------
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        pg_counts = conn.execute(
            "SELECT version, count(*) FROM schema_migrations GROUP BY version").fetchall()
    assert pg_counts and all(count == 1 for _, count in pg_counts), pg_counts
    ch_counts = clickhouse_reader.rows(
        "SELECT version, count() AS n FROM schema_migrations GROUP BY version")
    assert ch_counts and all(int(row["n"]) == 1 for row in ch_counts), ch_counts

    http = httpx.Client(headers=AUTH, timeout=20)
    urls = [server.base_url for server in pair]
    try:
        for run_id in ("race-1", "race-2"):
            created = http.post(f"{urls[0]}/api/v1/runs",
                                json={"project": "shared", "run_id": run_id})
            assert created.status_code == 201, created.text

        # --- cardinality: eight clients, half on each server, race for the same limits --------
        offered_names: set[str] = set()
        answers: list[httpx.Response] = []
        for round_ in range(ROUNDS):
            calls: list[Callable[[], httpx.Response]] = []
            for client in range(CLIENTS):
                names = [f"m-{round_}-{client}-{i}" for i in range(NAMES_PER_BATCH)]
                offered_names.update(names)
                body = {"run_id": "race-1" if client < CLIENTS // 2 + 2 else "race-2",
                        "batch_id": f"race-{round_}-{client}",
                        "series": [{"name": name, "steps": list(range(STEPS)),
                                    "values": [float(s) for s in range(STEPS)]}
                                   for name in names],
                        "tags": {f"t-{round_}-{client}": "v"}}
                if body["run_id"] == "race-2":
                    body["series"] = []  # race-2 competes for the project's tag keys only
                    offered_names.difference_update(names)
                url = f"{urls[client % 2]}/api/v1/ingest/batch"
                calls.append(lambda url=url, body=body: post(http, url, body))
            answers += at_once(calls)
        assert [a.status_code for a in answers] == [200] * len(answers), \
            [a.text for a in answers if a.status_code != 200][:3]

        with psycopg.connect(env["DATABASE_URL"]) as conn:
            stored_names = {name for (name,) in conn.execute(
                "SELECT name FROM run_metric_names WHERE run_id = 'race-1'").fetchall()}
            run_tag_counts = dict(conn.execute(
                "SELECT run_id, count(*) FROM run_tags GROUP BY run_id").fetchall())
            project_tag_keys = conn.execute(
                "SELECT count(*) FROM project_tag_keys").fetchone()
        assert len(stored_names) == MAX_NAMES and stored_names <= offered_names
        dropped = {w["code"]: 0 for a in answers for w in a.json()["warnings"]}
        for answer in answers:
            for warning in answer.json()["warnings"]:
                dropped[warning["code"]] += warning["dropped"]
        # Every name offered is either stored or reported dropped, never both, never neither.
        assert dropped.get("metric_names_limit", 0) == len(offered_names) - MAX_NAMES
        assert project_tag_keys == (MAX_PROJECT_TAGS,)
        assert all(count <= MAX_RUN_TAGS for count in run_tag_counts.values())
        assert sum(run_tag_counts.values()) == MAX_PROJECT_TAGS, run_tag_counts

        # --- the same batch sent to both servers at once is stored once ----------------------
        created = http.post(f"{urls[1]}/api/v1/runs", json={"project": "shared",
                                                             "run_id": "twice"})
        assert created.status_code == 201
        for index in range(8):
            body_bytes = batch_body("twice", 0, index, 8, 50)
            same = at_once([lambda url=url, b=body_bytes: post(
                http, f"{url}/api/v1/ingest/batch", b) for url in urls])
            assert [a.status_code for a in same] == [200, 200], [a.text for a in same]

        # ClickHouse holds the admitted names' points, exactly once, and nothing else.
        def stored(run_id: str) -> int:
            count: int = clickhouse_reader.scalar(
                f"SELECT count() FROM metrics FINAL WHERE run_id = '{run_id}'")
            return count

        wait_until(lambda: stored("race-1") == MAX_NAMES * STEPS and stored("twice") == 8 * 50,
                   60, "every acknowledged point in ClickHouse")
        names_in_clickhouse = {row["name"] for row in clickhouse_reader.rows(
            "SELECT DISTINCT name FROM metrics WHERE run_id = 'race-1'")}
        assert names_in_clickhouse == stored_names
        assert clickhouse_reader.scalar(
            "SELECT count() FROM metrics WHERE run_id = 'twice'") in range(400, 801)
        assert clickhouse_reader.scalar(
            "SELECT uniqExact(step) FROM metrics WHERE run_id = 'twice'") == 400

        # --- a key revoked on one server is refused by the other within ~2 s ------------------
        minted = http.post(f"{urls[0]}/api/v1/keys",
                           json={"name": "shared", "scopes": ["read", "write"]},
                           headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        assert minted.status_code == 201, minted.text
        key, key_id = minted.json()["key"], minted.json()["key_id"]
        as_key = {"Authorization": f"Bearer {key}", "content-type": "application/json"}

        def ingest_with_key(url: str, index: int) -> int:
            return http.post(f"{url}/api/v1/ingest/batch", headers=as_key,
                             content=batch_body("twice", 1, index, 8, 50)).status_code

        wait_until(lambda: ingest_with_key(urls[1], 0) == 200, 10, "server b to learn the key")
        revoked = http.delete(f"{urls[1]}/api/v1/keys/{key_id}",
                              headers={"Authorization": f"Bearer {TEST_API_KEY}"})
        assert revoked.status_code == 200
        revoked_at = time.monotonic()
        assert ingest_with_key(urls[1], 1) == 401  # at once on the server that revoked it
        index = 1
        while (status := ingest_with_key(urls[0], index)) == 200:
            assert time.monotonic() - revoked_at < REVOCATION_BOUND_S, (
                "server a still accepts a key revoked on server b")
            index = index % 7 + 1
            time.sleep(0.05)  # observing another process's reload
        assert status == 401
        time.sleep(2.5)  # past the next reload: it stays refused everywhere
        assert [ingest_with_key(url, 1) for url in urls] == [401, 401]
    finally:
        http.close()
    for process in processes:
        assert process.stop() == 0, process.log_text()[-3000:]
        assert "Traceback" not in process.log_text()
