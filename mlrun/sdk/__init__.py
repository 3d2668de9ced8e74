"""The Python SDK (client side). Must not import `mlrun.server`."""
