"""What client and server share: the msgspec Structs of every request and answer (schemas,
query_schemas, keys, artifacts), the machine codes (error_codes), the google.rpc.Status codec
(rpc_status), the instant format (timestamps), the protobuf run status table (proto_enums) and
the generated protobuf/purerpc stubs (proto/).
Must not import anything from `mlrun.server` or `mlrun.sdk`."""
