"""The garbage collector's view of a long-running process: what start-up left on the heap.

Owns `freeze_startup_heap()`, called by `mlrun serve` and `mlrun process` once they are up.

Why: CPython's oldest generation is collected now and then (when it grew by a quarter since the
last time), and such a collection walks every tracked object, most of which are the modules,
classes and functions imported at start-up (~59,000 objects before the first request). That
walk ran on the event loop for ~23 ms of CPU after the imports alone and ~43 ms in a serving
queued-mode server (measured with gc.callbacks during the queued bench at nominal load): a
request in flight meanwhile waits that long, which is a visible share of an ack p99 target of
50 ms. `gc.freeze()` moves what exists at start-up into a permanent generation that
collections skip (what it references stays alive anyway); objects made while serving are
collected as before.

Must not import the rest of the server.
"""

from __future__ import annotations

import gc
import logging

logger = logging.getLogger("mlrun.runtime")


def freeze_startup_heap() -> int:
    """Collect once, then leave everything alive now out of future collections; returns how
    many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d start-up objects out of the garbage collector's walks", frozen)
    return frozen
