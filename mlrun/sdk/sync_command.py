"""`mlrun sync [DIR]`: replay the spools that finished or crashed processes left behind.

DIR is a spool root (default: the configured `MLRUN_SPOOL_DIR`) or one run spool directory.
For each run spool directory, oldest first:
- take its lock; a directory whose lock is held belongs to a live process and is skipped
  (its own sender drains it);
- recover it (temp files dropped, damaged files quarantined under corrupt/);
- deliver its operations in order through the same sender and transport a live run uses:
  429s are waited out, outages retried with backoff, refusals kept under dead/ — and every
  batch keeps the batch_id it was formed with, so the server's idempotency ledger makes the
  replay exactly-once even if an earlier sync (or the process itself) sent part of it;
- remove the directory once nothing is left in it.

With `retry_dead_letters`, refused operations under dead/ are put back in line first (same
pos, same batch_id) — for refusals that were not the data's fault, such as a revoked key
(401/403) that has since been fixed.

Progress goes to stderr as plain text, one line per run spool, redrawn in place on a terminal.
Exit status: 0 when everything was replayed, 1 when something is left (server unreachable,
dead letters, a locked directory), 2 when DIR does not exist.

The lead wires `sync_command` into `mlrun/__main__.py`. Must not import `mlrun.server`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import TextIO

from mlrun.sdk.errors import SpoolLocked
from mlrun.sdk.ops import BatchOp, Op, decode_dead_letter, encode_op, op_kind
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.sender import Sender
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import Spool, run_spool_dirs
from mlrun.sdk.statistics import Counters
from mlrun.sdk.transport import Transport, open_transport

_BAR_WIDTH = 30


def sync_command(
    directory: str | Path | None = None,
    *,
    settings: Settings | None = None,
    out: TextIO | None = None,
    retry_dead_letters: bool = False,
    patience_s: float = 30.0,
) -> int:
    """Replay every spool under `directory`; returns the process exit status. Gives up on a
    run spool once the server has been unreachable (or 5xx) for `patience_s`: a server that
    was just restarted may answer 503 for a few seconds while its backends come up."""
    settings = dataclasses.replace(settings or Settings.load(), offline_after_s=patience_s)
    out = out or sys.stderr
    root = Path(directory).expanduser() if directory is not None else settings.spool_dir
    if not root.exists():
        print(f"mlrun sync: {root} does not exist", file=out)
        return 2
    run_dirs = run_spool_dirs(root)
    if not run_dirs:
        print(f"mlrun sync: nothing to replay under {root}", file=out)
        return 0
    transport = open_transport(settings)
    try:
        results = [_sync_one(path, transport, settings, out, retry_dead_letters)
                   for path in run_dirs]
    finally:
        transport.close()
    return 0 if all(results) else 1


def _sync_one(
    path: Path, transport: Transport, settings: Settings, out: TextIO, retry_dead_letters: bool
) -> bool:
    try:
        spool = Spool.open(path, max_bytes=settings.spool_max_bytes)
    except SpoolLocked:
        print(f"mlrun sync: {path.name}: in use by a live process, skipped", file=out)
        return False
    counters = Counters()
    progress = _Progress(path.name, out)
    try:
        if retry_dead_letters:
            _requeue_dead_letters(spool)
        entries = spool.recover()
        progress.total = len(entries)
        outbox = Outbox(spool, max_memory_ops=0, counters=counters, recovered=entries)
        sender = Sender(outbox, transport, settings=settings, counters=counters,
                        spool_dir=str(path))
        progress.draw()
        drained = sender.drain(on_settled=progress.advance)
        progress.finish(drained, counters)
        dead = len(spool.dead_letters())
        if dead:
            print(f"mlrun sync: {path.name}: {dead} refused operations are kept in "
                  f"{path / 'dead'}", file=out)
        return drained and dead == 0 and spool.statistics().quarantined_files == 0
    finally:
        spool.close(remove_if_empty=True)


def _requeue_dead_letters(spool: Spool) -> None:
    for path in spool.dead_letters():
        op = decode_dead_letter(spool.read_dead_letter(path)).op
        spool.write(op.pos, op_kind(op), encode_op(op), exempt=True)  # its bytes were counted
        spool.remove_dead_letter(path)


class _Progress:
    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.total = 0
        self.done = 0
        self.points = 0
        self._interactive = out.isatty()
        self._last_draw_s = 0.0

    def advance(self, op: Op) -> None:
        self.done += 1
        if isinstance(op, BatchOp):
            self.points += op.points
        # On a terminal, redraw at most 10 times a second; in a log, one line per 10%.
        if self._interactive:
            due = time.monotonic() - self._last_draw_s >= 0.1
        else:
            due = bool(self.total) and self.done * 10 // self.total != (
                self.done - 1) * 10 // self.total
        if due:
            self.draw()

    def draw(self) -> None:
        self._last_draw_s = time.monotonic()
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * _BAR_WIDTH)
        bar = "#" * filled + "." * (_BAR_WIDTH - filled)
        line = (f"mlrun sync: {self.label} [{bar}] {self.done}/{self.total} operations, "
                f"{self.points} points")
        if self._interactive:
            self.out.write("\r" + line)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self, drained: bool, counters: Counters) -> None:
        self.draw()
        if self._interactive:
            self.out.write("\n")
        state = "done" if drained else "stopped: the server is unreachable; the rest stays"
        self.out.write(f"mlrun sync: {self.label}: {state} ({counters.duplicate_batches} "
                       f"batches were already stored)\n")
        self.out.flush()
