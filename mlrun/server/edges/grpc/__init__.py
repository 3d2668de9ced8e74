"""The gRPC edge (purerpc): servicers that translate protobuf messages to the same use-cases the
HTTP edge calls. No business logic lives here."""
