"""Run-listing filters have limits, and every shape within them is cheap.

The outside probe made a read-only key keep PostgreSQL busy with 100-200 filter terms (1.5-5 s
per request, then a retryable 503 for a request that could never succeed). Now:
- at most MAX_FILTER_TERMS tag terms and MAX_FILTER_TERMS param terms per listing, each name
  and value within the stored limits: past that 400 naming the parameter;
- random shapes within and past the limits (a seeded fuzz over the HTTP query string) are always
  answered 200 or 400, never 5xx, and the server keeps serving;
- the worst allowed listing (every term, numeric comparisons, over runs that carry all those
  params and tags) is answered within WORST_ALLOWED_S on this 2-core machine.
"""

from __future__ import annotations

import random
import string
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlrun.server.errors import InvalidInput
from mlrun.server.usecases.listing import MAX_FILTER_TERMS, build_listing

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(240)
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}
# The stated bound for the worst allowed request (measured 94-124 ms; generous for a shared box).
WORST_ALLOWED_S = 1.0
SEEDED_RUNS = 300


def listing(**fields: object) -> object:
    defaults: dict[str, object] = dict(
        project=None, statuses=(), tags=(), params=(), text=None, created_after=None,
        created_before=None, sort="-created_at", limit=10, cursor=None, include_total=False)
    defaults.update(fields)
    return build_listing(**defaults)  # type: ignore[arg-type]


def test_too_many_terms_or_too_long_a_term_is_400_naming_the_parameter() -> None:
    for field in ("tags", "params"):
        terms = [f"k{i}=v" for i in range(MAX_FILTER_TERMS + 1)]
        with pytest.raises(InvalidInput) as caught:
            listing(**{field: terms})
        assert (caught.value.code, caught.value.field) == ("too_many_filter_terms", field)
        listing(**{field: terms[:MAX_FILTER_TERMS]})  # the limit itself is fine
        with pytest.raises(InvalidInput) as long_key:
            listing(**{field: ["k" * 251 + "=v"]})
        assert (long_key.value.code, long_key.value.field) == ("value_too_long", field)


@pytest.fixture
def seeded_server(server_env: dict[str, str], tmp_path: Path,
                  servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as server, \
            httpx.Client(base_url=server.base_url, headers=AUTH, timeout=10) as http:
        for index in range(SEEDED_RUNS):
            created = http.post("/api/v1/runs", json={
                "project": "listing", "run_id": f"run-{index}",
                "tags": {f"t{k}": f"v{(index + k) % 3}" for k in range(MAX_FILTER_TERMS)},
                "config": {f"p{k}": (index * 7 + k) % 100 / 10 for k in range(MAX_FILTER_TERMS)}})
            assert created.status_code == 201, created.text
        yield server


def worst_allowed_query() -> dict[str, str]:
    return {
        "project": "listing",
        "tags": ",".join(f"t{k}" for k in range(MAX_FILTER_TERMS)),
        "params": ",".join(f"p{k}>={k % 5 / 10}" for k in range(MAX_FILTER_TERMS)),
        "q": "run", "sort": "-created_at", "limit": "100", "include_total": "true",
    }


def test_the_worst_allowed_listing_is_fast(seeded_server: ServerProcess) -> None:
    timings = []
    with httpx.Client(base_url=seeded_server.base_url, headers=AUTH, timeout=30) as http:
        for _ in range(5):
            started = time.perf_counter()
            answer = http.get("/api/v1/runs", params=worst_allowed_query())
            timings.append(time.perf_counter() - started)
            assert answer.status_code == 200, answer.text
    print(f"\nworst allowed listing over {SEEDED_RUNS} runs: "
          f"{', '.join(f'{t * 1000:.0f}' for t in timings)} ms")
    assert max(timings) < WORST_ALLOWED_S


def random_term(rng: random.Random, field: str) -> str:
    key = rng.choice([f"p{rng.randrange(30)}", f"t{rng.randrange(30)}",
                      "".join(rng.choices(string.printable, k=rng.randrange(1, 300)))])
    if field == "tags" and rng.random() < 0.3:
        return key
    operator = rng.choice(["=", "!=", ">", ">=", "<", "<=", "=="]) if field == "params" else "="
    value = rng.choice([str(rng.uniform(-10, 10)), "1e999", "abc", "", "\\,", "x" * 300])
    return f"{key}{operator}{value}"


def test_random_filter_shapes_are_200_or_400_never_5xx(seeded_server: ServerProcess) -> None:
    rng = random.Random(20261203)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=seeded_server.base_url, headers=AUTH, timeout=30) as http:
        for _ in range(150):
            query = {"project": "listing"}
            for field in ("tags", "params"):
                count = rng.choice([0, 1, 5, MAX_FILTER_TERMS, MAX_FILTER_TERMS + 1, 60])
                query[field] = ",".join(random_term(rng, field) for _ in range(count))
            if rng.random() < 0.3:
                query["q"] = "".join(rng.choices(string.printable, k=rng.randrange(1, 50)))
            started = time.perf_counter()
            answer = http.get("/api/v1/runs?" + urllib.parse.urlencode(query))
            elapsed = time.perf_counter() - started
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            assert answer.status_code in (200, 400, 431), (answer.status_code, answer.text)
            if answer.status_code == 200:
                assert elapsed < WORST_ALLOWED_S, (elapsed, query)
            else:
                assert answer.json()["error"]["field"]  # the parameter is named
        assert http.get("/api/v1/runs", params={"project": "listing"}).status_code == 200
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0, statuses


def test_expensive_readers_do_not_starve_others(seeded_server: ServerProcess) -> None:
    """Twelve clients sending the worst allowed listing back to back; meanwhile a run detail
    and an ingest batch are still answered promptly (reads hold at most half the pool)."""
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=seeded_server.base_url, headers=AUTH, timeout=30) as http:
            deadline = time.monotonic() + 20
            while not stop.is_set() and time.monotonic() < deadline:
                http.get("/api/v1/runs", params=worst_allowed_query())

    threads = [threading.Thread(target=hammer) for _ in range(12)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)  # the listings are under way
        with httpx.Client(base_url=seeded_server.base_url, headers=AUTH, timeout=30) as http:
            latencies = {}
            for label, send in (
                ("detail", lambda: http.get("/api/v1/runs/run-7")),
                ("ingest", lambda: http.post("/api/v1/ingest/batch", json={
                    "run_id": "run-7", "batch_id": "starve-1",
                    "metrics": [{"name": "loss", "value": 0.5, "step": 1}]})),
            ):
                started = time.perf_counter()
                answer = send()
                latencies[label] = time.perf_counter() - started
                assert answer.status_code == 200, answer.text
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    shown = {k: round(v * 1000) for k, v in latencies.items()}
    print(f"\nunder 12 expensive readers: {shown} ms")
    assert max(latencies.values()) < WORST_ALLOWED_S
