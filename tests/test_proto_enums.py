"""The run status table between the wire literals and `mlrun.v1.RunStatus` is complete both ways:
a status added to either side without the other fails here, not in a servicer at run time."""

from __future__ import annotations

from typing import get_args

from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.proto_enums import (
    FINAL_STATUS_FROM_PROTO,
    RUN_STATUS_FROM_PROTO,
    RUN_STATUS_TO_PROTO,
)
from mlrun.wire.schemas import FinalStatus, RunStatus


def test_every_status_has_its_proto_number_and_back() -> None:
    assert set(RUN_STATUS_TO_PROTO) == set(get_args(RunStatus))
    proto_numbers = {number for name, number in ingest_pb2.RunStatus.items()
                     if name != "RUN_STATUS_UNSPECIFIED"}
    assert set(RUN_STATUS_FROM_PROTO) == proto_numbers
    assert {RUN_STATUS_FROM_PROTO[n]: n for n in proto_numbers} == RUN_STATUS_TO_PROTO


def test_finish_accepts_the_final_statuses_only() -> None:
    assert set(FINAL_STATUS_FROM_PROTO.values()) == set(get_args(FinalStatus))
    assert ingest_pb2.RUN_STATUS_RUNNING not in FINAL_STATUS_FROM_PROTO
    assert ingest_pb2.RUN_STATUS_UNSPECIFIED not in FINAL_STATUS_FROM_PROTO
