"""Generated protobuf and purerpc stubs of `proto/`. DO NOT EDIT.

Regenerate with `python scripts/gen_proto.py`. Made by the protoc of grpcio-tools 1.85.1
(`*_pb2.py`, `*_pb2.pyi`) and purerpc 0.8.0's protoc plugin (`*_grpc.py`), one module
tree per proto directory: `proto/mlrun/v1/ingest.proto` gives `mlrun.wire.proto.mlrun.v1.ingest_pb2`
and `.ingest_grpc`. `tests/test_proto_stubs.py` fails when these files are stale.
"""
