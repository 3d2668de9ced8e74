"""The protobuf API's run status in the wire's words: `mlrun.v1.RunStatus` against the `RunStatus`
and `FinalStatus` literals of `mlrun.wire.schemas`, one table for the server's gRPC servicers and
the SDK's gRPC transport.

Must not import the server, the SDK or grpc (the protobuf runtime is a core dependency; the SDK
imports this module only when it opens its gRPC transport).
Invariant: the tables are inverses of each other, and `RUN_STATUS_UNSPECIFIED` (0, what an unset
field reads as) is in none of them, so a caller that looks it up finds nothing.
"""

from __future__ import annotations

from typing import Final, cast, get_args

from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.schemas import FinalStatus, RunStatus

RUN_STATUS_TO_PROTO: Final[dict[RunStatus, ingest_pb2.RunStatus]] = {
    "running": ingest_pb2.RUN_STATUS_RUNNING,
    "finished": ingest_pb2.RUN_STATUS_FINISHED,
    "failed": ingest_pb2.RUN_STATUS_FAILED,
    "killed": ingest_pb2.RUN_STATUS_KILLED,
}
RUN_STATUS_FROM_PROTO: Final[dict[int, RunStatus]] = {
    int(number): name for name, number in RUN_STATUS_TO_PROTO.items()
}
# What FinishRun accepts: the final statuses only (a run cannot be finished as "running").
FINAL_STATUS_FROM_PROTO: Final[dict[int, FinalStatus]] = {
    number: cast(FinalStatus, name) for number, name in RUN_STATUS_FROM_PROTO.items()
    if name in get_args(FinalStatus)
}
