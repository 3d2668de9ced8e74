"""Generated from `proto/mlrun/v1/` by scripts/gen_proto.py. DO NOT EDIT."""
