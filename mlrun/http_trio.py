"""hypercorn's trio TCP server with a cheaper keep-alive timer (hypercorn is pinned to 0.17.3).

Owns `KeepAliveDeadlineTCPServer` and `install()`, which makes `hypercorn.trio.serve` use it.

Why: hypercorn 0.17.3 (trio) stops the connection's keep-alive timer when a request arrives and
starts a new one when its answer is out: `TrioSingleTask.restart`, which takes a lock, cancels
the old task and `nursery.start`s a new one, on every request. On the 2-core box this was ~20 %
of the server CPU of a kept-alive `GET /health` (measured with `python -m bench --workloads
floor` and an in-process cProfile: ~13 trips through trio's scheduler per request, a new task
per request for the timer alone). Here the timer is ONE task per connection whose cancel
scope's deadline moves: "now + keep_alive_timeout" when the connection goes idle, infinity while
a request is in progress. Same behaviour (an idle connection is closed after
`keep_alive_timeout`, a busy one never; server shutdown still closes idle connections at once
through `context.terminated`), no task and no lock per request.

When the watcher is not running (before it started, or after it fired), events take hypercorn's
own path unchanged. The asyncio backend is left as hypercorn ships it.

Only `mlrun.__main__` imports this module (with trio as the backend): like it, this module may
import trio and hypercorn's backend modules; nothing else of mlrun may.
"""

from __future__ import annotations

import math

import hypercorn.trio.run
import trio
from hypercorn.events import Event, Updated
from hypercorn.trio.tcp_server import TCPServer


class KeepAliveDeadlineTCPServer(TCPServer):
    """`TCPServer` whose keep-alive timer is one long-lived task with a moving deadline."""

    _idle_scope: trio.CancelScope | None = None

    async def protocol_send(self, event: Event) -> None:
        scope = self._idle_scope
        if scope is not None and isinstance(event, Updated):
            scope.deadline = (trio.current_time() + self.config.keep_alive_timeout
                              if event.idle else math.inf)
            return
        await super().protocol_send(event)

    async def _idle_timeout(self) -> None:
        deadline = trio.current_time() + self.config.keep_alive_timeout
        with trio.CancelScope(deadline=deadline) as scope:
            self._idle_scope = scope
            try:
                await self.context.terminated.wait()
            finally:
                self._idle_scope = None
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


def install() -> None:
    """Make `hypercorn.trio.serve` build its connections with `KeepAliveDeadlineTCPServer`."""
    setattr(hypercorn.trio.run, "TCPServer", KeepAliveDeadlineTCPServer)  # noqa: B010
