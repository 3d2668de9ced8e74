"""Generated from `proto/grpc/health/` by scripts/gen_proto.py. DO NOT EDIT."""
