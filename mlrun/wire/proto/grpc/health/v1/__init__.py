"""Generated from `proto/grpc/health/v1/` by scripts/gen_proto.py. DO NOT EDIT."""
