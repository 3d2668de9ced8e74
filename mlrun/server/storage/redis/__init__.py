"""Redis: a small async RESP client on anyio streams (redis.asyncio does not run on trio)."""
