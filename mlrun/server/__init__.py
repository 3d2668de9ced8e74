"""The MLRun server: config, errors, supervisor, storage and the HTTP and gRPC edges.

Nothing under `mlrun.server` may import trio or hypercorn's backend modules directly; the
entry point (`mlrun.__main__`) picks the event loop. Code is written against anyio only.
"""
