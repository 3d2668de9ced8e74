"""Generated from `proto/grpc/` by scripts/gen_proto.py. DO NOT EDIT."""
