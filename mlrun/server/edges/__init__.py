"""The edges: HTTP (`http/`) and gRPC (`grpc/`) translate requests into use-case calls and the
error tree into answers. They import use-cases, wire types and the error tree; never storage,
pipelines or protocols."""
