"""NUL characters are refused with a 400 naming the field, on both edges' decoding paths
(`payloads.decode_json` for HTTP bodies, `payloads.convert` for the gRPC edge's builtins), and
the cheap filters in front of the walk never let one through. Pure: no loop, no server."""

from __future__ import annotations

import pytest

from mlrun.server.edges import payloads
from mlrun.server.edges.grpc.ingest_servicer import batch_from_proto
from mlrun.server.errors import InvalidInput
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.proto.mlrun.v1 import ingest_pb2
from mlrun.wire.schemas import IngestBatch, IngestBatchBody


def _proto(**fields: str) -> ingest_pb2.LogBatchRequest:
    message = ingest_pb2.LogBatchRequest(run_id="r1", batch_id=fields.get("batch_id", "b1"))
    column = message.metric_columns.add()
    column.name = fields.get("series_name", "loss")
    column.steps.extend(range(500))
    column.values.extend(float(i) for i in range(500))
    for i in range(300):
        point = message.metrics.add()
        point.name = fields.get("point_name", "acc") if i == 299 else "acc"
        point.value, point.step = 0.5, i
    tag = message.tags.add()
    tag.key, tag.value = fields.get("tag_key", "team"), fields.get("tag_value", "cv")
    param = message.params.add()
    param.name = "opt"
    param.value.string_value = fields.get("param_value", "adam")
    return message


@pytest.mark.parametrize(("fields", "path"), [
    ({"batch_id": "b\x001"}, "batch_id"),
    ({"series_name": "lo\x00ss"}, "series[0].name"),
    ({"point_name": "a\x00"}, "metrics[299].name"),
    ({"tag_key": "\x00"}, "tags[0].key"),
    ({"tag_value": "c\x00v"}, "tags[0].value"),
    ({"param_value": "ad\x00am"}, "params[0].value"),
])
def test_grpc_batch_with_nul_is_refused_naming_the_field(fields: dict[str, str],
                                                         path: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        batch_from_proto(_proto(**fields))
    assert raised.value.code == ErrorCode.INVALID_FIELD
    assert raised.value.field == path


def test_grpc_batch_without_nul_converts_every_point() -> None:
    batch = batch_from_proto(_proto())
    assert len(batch.series[0].steps) == 500 and len(batch.metrics) == 300
    assert batch.tags[0].key == "team" and batch.params[0].value == "adam"


def test_convert_walks_dict_keys_and_values() -> None:
    with pytest.raises(InvalidInput) as raised:
        payloads.convert({"run_id": "r1", "tags": [{"key": "k", "value": "v"}],
                          "params": [{"name": "p", "value": "x\x00"}]}, IngestBatch)
    assert raised.value.field == "params[0].value"


def test_json_body_with_escaped_nul_is_refused_and_an_escaped_backslash_is_not() -> None:
    with pytest.raises(InvalidInput) as raised:
        payloads.decode_json(b'{"run_id": "r1", "tags": {"te\\u0000am": "cv"}}', IngestBatchBody)
    assert raised.value.field == "tags.'te\\x00am'"
    # A literal backslash followed by u0000 is text, not a NUL: accepted.
    body = payloads.decode_json(b'{"run_id": "r1", "tags": {"team": "c\\\\u0000v"}}',
                                IngestBatchBody)
    assert body.batch().tags[0].value == "c\\u0000v"
