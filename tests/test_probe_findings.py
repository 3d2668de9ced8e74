"""What the outside probe found, each answered as it must be now, on a real server:

- two credentials (a repeated `Authorization`, or `Authorization` and `X-API-Key` together)
  are refused with 400 `duplicate_credentials`, over HTTP and gRPC: a proxy that checks the
  first value and a server that used the last one could disagree about who is calling;
- a project-scoped key cannot tell another project's run from a run that does not exist
  (404 `run_not_found` for both);
- a key for a project that does not exist is 404 `project_not_found`, not a new project;
- a name too long in UTF-8 bytes is reported at its exact field path;
- (a newcomer) params and tags are accepted in the object form that reads answer with; an
  enum error lists the allowed values; a query-string error says "query parameter".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from mlrun.server.edges import payloads
from mlrun.server.edges.http.query_api import decode_query
from mlrun.server.errors import InvalidInput
from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.query_schemas import ListRunsQuery, MetricsQuery
from mlrun.wire.schemas import FinishRun

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(120)
ADMIN = {"Authorization": f"Bearer {TEST_API_KEY}"}


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def post(server: ServerProcess, path: str, body: dict[str, Any],
         headers: list[tuple[str, str]] | dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=10)


def error_of(response: httpx.Response) -> tuple[int, str, str | None]:
    error = response.json()["error"]
    return response.status_code, error["code"], error.get("field")


def test_two_credentials_are_refused_over_http(server: ServerProcess) -> None:
    project = {"name": "probe-creds"}
    repeated = [("authorization", f"Bearer {TEST_API_KEY}"), ("authorization", "Bearer other")]
    both = [("authorization", f"Bearer {TEST_API_KEY}"), ("x-api-key", TEST_API_KEY)]
    for headers in (repeated, both):
        answer = post(server, "/api/v1/projects", project, headers=headers)
        assert error_of(answer)[:2] == (400, "duplicate_credentials"), answer.text
    assert post(server, "/api/v1/projects", project).status_code == 201  # one is fine


def test_two_credentials_are_refused_over_grpc(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.grpc_target) as channel:
        init = channel.unary_unary(
            "/mlrun.v1.IngestService/InitRun",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=ingest_pb2.InitRunResponse.FromString)
        with pytest.raises(grpc.RpcError) as caught:
            init(ingest_pb2.InitRunRequest(project="probe-grpc"), timeout=10, metadata=(
                ("authorization", f"Bearer {TEST_API_KEY}"), ("x-api-key", TEST_API_KEY)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailing = dict(caught.value.trailing_metadata() or ())
    assert trailing["mlrun-error-code"] == "duplicate_credentials"


def test_a_scoped_key_cannot_tell_another_projects_run_from_no_run(server: ServerProcess) -> None:
    for name in ("probe-a", "probe-b"):
        post(server, "/api/v1/projects", {"name": name})
    created = post(server, "/api/v1/keys", {"name": "a", "scopes": ["read", "write"],
                                            "project": "probe-a"})
    assert created.status_code == 201, created.text
    scoped = {"Authorization": f"Bearer {created.json()['key']}"}
    other = post(server, "/api/v1/runs", {"project": "probe-b"}).json()["run_id"]
    answers = {}
    for label, run_id in (("other project", other), ("no such run", "no-such-run-anywhere")):
        heartbeat = post(server, f"/api/v1/runs/{run_id}/heartbeat", {}, headers=scoped)
        read = httpx.get(f"{server.base_url}/api/v1/runs/{run_id}", headers=scoped, timeout=10)
        answers[label] = (error_of(heartbeat)[:2], error_of(read)[:2])
    assert answers["other project"] == answers["no such run"] == (
        (404, "run_not_found"), (404, "run_not_found"))


def test_a_key_for_an_unknown_project_is_not_found(server: ServerProcess) -> None:
    answer = post(server, "/api/v1/keys", {"name": "typo", "scopes": ["read"],
                                           "project": "no-such-project"})
    assert error_of(answer) == (404, "project_not_found", "project")
    projects = httpx.get(f"{server.base_url}/api/v1/projects", headers=ADMIN, timeout=10).json()
    assert "no-such-project" not in str(projects)


def test_a_name_too_long_in_bytes_names_its_exact_field(server: ServerProcess) -> None:
    run_id = post(server, "/api/v1/runs", {"project": "probe-names"}).json()["run_id"]
    long_name = "é" * 140  # 140 characters (under the 250 cap), 280 bytes (over 256)
    rows = post(server, "/api/v1/ingest/batch", {"run_id": run_id, "metrics": [
        {"name": "ok", "value": 1.0, "step": 0}, {"name": long_name, "value": 1.0, "step": 0}]})
    series = post(server, "/api/v1/ingest/batch", {"run_id": run_id, "series": [
        {"name": long_name, "steps": [0], "values": [1.0]}]})
    assert error_of(rows) == (400, "value_too_long", "metrics[1].name")
    assert error_of(series) == (400, "value_too_long", "series[0].name")


def test_the_documented_16_kib_head_limit_holds_on_a_real_server(server: ServerProcess) -> None:
    """hypercorn alone let a head of ~64 KiB through when it arrived in one read."""
    padding = {"x-padding": "p" * (40 * 1024), **ADMIN}
    answer = httpx.get(f"{server.base_url}/api/v1/projects", headers=padding, timeout=10)
    assert answer.status_code == 431
    assert httpx.get(f"{server.base_url}/api/v1/projects", headers=ADMIN,
                     timeout=10).status_code == 200


def test_params_and_tags_are_accepted_in_the_object_form_reads_answer_with(
    server: ServerProcess,
) -> None:
    """A newcomer writes what the read API shows (`{"lr": 0.01}`); the list form stays valid,
    and the two forms of the same batch are the same batch (a resend is a duplicate)."""
    run_id = post(server, "/api/v1/runs", {"project": "probe-forms"}).json()["run_id"]
    objects = {"run_id": run_id, "batch_id": "b1", "params": {"lr": 0.01, "opt": "adam"},
               "tags": {"team": "cv"}, "metrics": [{"name": "loss", "value": 1.0, "step": 0}]}
    first = post(server, "/api/v1/ingest/batch", objects)
    assert first.status_code == 200, first.text
    assert first.json()["duplicate"] is False
    as_lists = {**objects, "params": [{"name": "lr", "value": 0.01},
                                      {"name": "opt", "value": "adam"}],
                "tags": [{"key": "team", "value": "cv"}]}
    again = post(server, "/api/v1/ingest/batch", as_lists)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    run = httpx.get(f"{server.base_url}/api/v1/runs/{run_id}", headers=ADMIN, timeout=10).json()
    assert (run["params"], run["tags"]) == ({"lr": "0.01", "opt": "adam"}, {"team": "cv"})


def test_enum_errors_list_the_allowed_values_and_query_errors_say_query_parameter() -> None:
    def refused(call: Any) -> InvalidInput:
        with pytest.raises(InvalidInput) as caught:
            call()
        return caught.value

    status = refused(lambda: payloads.decode_json(b'{"status": "done"}', FinishRun))
    assert status.field == "status"
    assert status.message == "status: 'done' is not one of failed, finished, killed"
    method = refused(lambda: decode_query({"method": ["bogus"]}, MetricsQuery))
    assert method.field == "method" and method.message.startswith("query parameter method:")
    assert "avg, lttb, minmax, raw" in method.message
    typo = refused(lambda: decode_query({"limt": ["5"]}, ListRunsQuery))
    assert typo.field == "limt"
    assert typo.message.startswith("unknown query parameter 'limt'; this route accepts: ")
    assert "limit" in typo.message
