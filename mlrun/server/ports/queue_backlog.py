"""The queue's backlog as a purge sees it: the metric rows a server admitted that may not be in
ClickHouse yet (queued ingest: stream entries no processor has committed and acknowledged).

A purge job deletes a run's ClickHouse rows once; a batch of that run admitted before the
delete but still waiting in the queue would be inserted after it and stay behind. So the purge
first takes a mark of the queue (`newest`) and waits until nothing at or before that mark is
left (`left_up_to`). Entries are removed from their stream when acknowledged, so "left" means
"not committed yet". Import nothing but the standard library.
"""

from __future__ import annotations

from typing import Protocol

# The newest entry id of every stream of the queue at one moment (b"0-0" for an empty stream).
BacklogMark = tuple[bytes, ...]


class QueueBacklog(Protocol):
    async def newest(self) -> BacklogMark:
        """A mark: every entry admitted until now is at or before it."""
        ...

    async def left_up_to(self, mark: BacklogMark) -> int:
        """Streams still holding an entry at or before `mark` (0: all of it was committed)."""
        ...
