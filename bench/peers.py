"""The `peers` workload: the same MLflow log-batch load against MLRun and against any other server
that speaks MLflow's REST API, side by side in one run.

For each server — MLRun itself (its MLflow edge) first, then every `--peer NAME=URL` — and each
writer count K: an experiment and K runs are created through MLflow's API
(`experiments/create`, `runs/create`), then K writers send 1000-point log-batch requests
(`bench.mlflow.MlflowBatchSender`, kept-alive connections) for the workload's duration.
Reported per server and K (as lines of the report's notes): points/s, request p50/p99, errors,
and the rate over MLRun's at the same K. A peer is asked with `MLFLOW_TRACKING_TOKEN`'s token
when the variable is set, else with none. Points are not counted back from a peer (its storage
is its own); MLRun's are, by the `mlflow` transport of the ingest workload.

Starting the peers is up to the caller (they are not dependencies of MLRun), e.g.
`mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri postgresql://...` (the `mlflow`
package) or `fml server` (the `fasttrackml` wheel, SQLite by default):

    python -m bench --workloads peers --writers 1,8,32 \\
        --peer mlflow=http://127.0.0.1:5000 --peer fasttrackml=http://127.0.0.1:5001

Must not import the server or anyio.
"""

from __future__ import annotations

import http.client
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from bench.batches import Batch, BatchShape, make_batch
from bench.errors import BenchError
from bench.ingest import _connection
from bench.mlflow import MlflowBatchSender
from bench.report import latency_summary
from bench.targets import Target
from bench.writers import Limits, Sender, run_writers


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    url: str
    token: str | None


def parse_peer(text: str) -> tuple[str, str]:
    name, equals, url = text.partition("=")
    if not equals or not name or not url.startswith(("http://", "https://")):
        raise ValueError(f"--peer takes NAME=http://host:port, got {text!r}")
    return name, url.rstrip("/")


def _post(peer: Peer, path: str, payload: dict[str, Any], timeout_s: float) -> Any:
    connection = _connection(peer.url, timeout_s)
    headers = {"Content-Type": "application/json"}
    if peer.token:
        headers["Authorization"] = f"Bearer {peer.token}"
    try:
        connection.request("POST", path, body=msgspec.json.encode(payload), headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"{peer.name}: POST {path} failed: {exc}") from exc
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"{peer.name}: POST {path} answered {response.status}: {body[:200]!r}")
    return msgspec.json.decode(body)


def _runs(peer: Peer, writers: int, session: str, timeout_s: float) -> list[str]:
    experiment = _post(peer, "/api/2.0/mlflow/experiments/create",
                       {"name": f"bench-peers-{session}-{peer.name}-k{writers}"}, timeout_s)
    return [_post(peer, "/api/2.0/mlflow/runs/create",
                  {"experiment_id": experiment["experiment_id"],
                   "start_time": int(time.time() * 1000)},
                  timeout_s)["run"]["info"]["run_id"] for _ in range(writers)]


def run_peers(target: Target, peers: Sequence[tuple[str, str]], *, writers: Sequence[int],
              limits: Limits, shape: BatchShape, request_timeout_s: float,
              progress: Callable[[str], None]) -> list[str]:
    """One note per (server, K), MLRun's first; the rates over MLRun's at the same K."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    servers = [Peer("mlrun", target.http_url, target.api_key),
               *(Peer(name, url, token) for name, url in peers)]
    session = secrets.token_hex(4)
    notes: list[str] = []
    mlrun_rate: dict[int, float] = {}
    for server in servers:
        for count in writers:
            progress(f"peers: {count} writer(s) of MLflow log-batch to {server.name}"
                     f" ({server.url})")
            run_ids = _runs(server, count, session, request_timeout_s)
            senders: list[Sender[bytes]] = []
            try:
                for _ in range(count):
                    senders.append(MlflowBatchSender(server.url, server.token or "",
                                                     timeout_s=request_timeout_s))
            except BaseException:
                for sender in senders:
                    sender.close()
                raise

            def batch_of(writer: int, seq: int, run_ids: list[str] = run_ids) -> Batch:
                return make_batch(shape, run_ids[writer], seq)

            run = run_writers(senders, batch_of, limits, request_timeout_s=request_timeout_s)
            rate = run.acked_points / run.elapsed_s if run.elapsed_s else 0.0
            if server.name == "mlrun":
                mlrun_rate[count] = rate
            latency = latency_summary(run.latencies_s())
            errors = sum(run.errors().values())
            versus = (f"; MLRun's rate is {mlrun_rate[count] / rate:.2f}x this" if
                      server.name != "mlrun" and rate > 0 and count in mlrun_rate else "")
            notes.append(f"peers {server.name} K={count}: {rate:,.0f} points/s, p50"
                         f" {latency.p50} ms, p99 {latency.p99} ms, {errors} errors{versus}")
    return notes
