"""The HTTP edge (ASGI, served by hypercorn): routing, request decoding and error rendering.
It only translates; use-cases live in `mlrun.server.usecases`."""
