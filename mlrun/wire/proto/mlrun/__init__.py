"""Generated from `proto/mlrun/` by scripts/gen_proto.py. DO NOT EDIT."""
