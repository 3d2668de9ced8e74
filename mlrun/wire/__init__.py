"""What client and server share: msgspec schemas and the generated protobuf/purerpc stubs.
Must not import anything from `mlrun.server` or `mlrun.sdk`."""
