"""`Run`: the SDK's public object, and the module-level API over the active run
(`init`, `log`, `log_params`, `log_tags`, `log_artifact`, `flush`, `finish`).

Threads of a run: the caller's (the training loop: `log()` only appends a tuple to a deque),
the batcher (forms batches; see `mlrun.sdk.batcher`), the sender (delivers them; see
`mlrun.sdk.sender`), and optionally the system monitor. All are daemon threads, so an
interpreter exit never waits on a stuck network call; the `atexit` hook finishes every live
run instead, with its bounded deadline.

Lifecycle:
- `init` picks the run id on the client (uuid4 hex unless given) and queues the run's creation
  as the first operation, then waits up to `init_timeout_s` for the server's answer: a refusal
  (bad key, bad project) raises `RunRejected`; no answer in time is fine — logging goes on,
  the creation is retried, spooled, and replayed with everything else (InitRun is idempotent
  on run_id, so a run created offline is created on the server at replay time).
- `flush(timeout_s)`: everything logged before the call is acknowledged (returns True) or, at
  the deadline, durable in the spool (returns False).
- `finish(status, timeout_s)`: the last batch and the finish are queued, delivery gets until
  the deadline, and whatever is not acknowledged by then is left in the spool directory for
  `mlrun sync` (a warning names it). `with mlrun.init(...) as run:` finishes with "failed" on an
  exception ("killed" on KeyboardInterrupt) and re-raises.

Artifacts: `log_artifact(path)` hands the file to the run's uploader thread (see
`mlrun.sdk.artifacts`, imported on first use because it imports httpx) and returns its
progress handle; `finish` waits for pending uploads within its deadline, then cancels them.

Steps: `log(metrics)` without a step uses the previous step + 1 (starting at 0); an explicit
step sets the counter. Steps from several threads should be explicit.

Must not import httpx, grpc (see `mlrun.sdk.transport`) or `mlrun.server`.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from mlrun.sdk.batcher import FINISH, FLUSH, METRICS, PARAMS, SYSTEM, TAGS, Batcher, FlushRequest
from mlrun.sdk.errors import InvalidArgument, RunClosed, RunRejected
from mlrun.sdk.ops import FinishOp, InitOp
from mlrun.sdk.outbox import Outbox
from mlrun.sdk.retry import Rejected
from mlrun.sdk.sender import Sender
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import Spool
from mlrun.sdk.statistics import Counters, RunStatistics
from mlrun.sdk.system_monitor import SystemMonitor
from mlrun.sdk.transport import Transport, open_transport
from mlrun.wire.schemas import FinalStatus, FinishRun, InitRun, ScalarValue

if TYPE_CHECKING:
    from mlrun.sdk.artifacts import ArtifactUpload, ArtifactUploader

logger = logging.getLogger("mlrun.sdk")

_time = time.time
_init_validator = msgspec.json.Decoder(InitRun)
_STOP_JOIN_S = 1.0  # how long finish waits for a thread it stopped (an attempt in progress)
_BATCHER_JOIN_S = 5.0


class Run:
    """One tracked run. Create it with `mlrun.init(...)`."""

    def __init__(
        self,
        project: str,
        *,
        name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        settings: Settings,
    ) -> None:
        init = _init_request(project, name, run_id or uuid.uuid4().hex, tags, config)
        self.project = project
        self.run_id: str = init.run_id or ""
        self.name = name
        self.settings = settings
        self._closed = False
        self._finish_lock = threading.Lock()
        self._step = -1
        self._system_step = 0
        self._counters = Counters()
        self._uploader: ArtifactUploader | None = None
        directory = settings.spool_dir / f"{int(_time() * 1000):013d}.{os.getpid()}.{self.run_id}"
        self._spool = Spool.open(directory, max_bytes=settings.spool_max_bytes)
        try:
            self._start(init, settings)
        except BaseException:
            self._spool.close(remove_if_empty=True)  # e.g. a transport that failed to open
            raise
        _register(self)

    def _start(self, init: InitRun, settings: Settings) -> None:
        directory = self._spool.directory
        self._outbox = Outbox(self._spool, max_memory_ops=settings.max_queued_batches,
                              counters=self._counters)
        self._batcher = Batcher(self.run_id, outbox=self._outbox, counters=self._counters,
                                max_points=settings.max_batch_points,
                                max_bytes=settings.max_batch_bytes,
                                max_age_s=settings.max_batch_age_s)
        self._entries = self._batcher.entries
        self._nudge_at = self._batcher.nudge_at
        self._transport: Transport | None = None
        self._sender: Sender | None = None
        if settings.offline:
            self._outbox.set_offline(True)  # everything straight to disk, for `mlrun sync`
        else:
            self._transport = open_transport(settings)
            self._sender = Sender(self._outbox, self._transport, settings=settings,
                                  counters=self._counters, run_id=self.run_id,
                                  spool_dir=str(directory))
        self._outbox.push(InitOp(request=init))
        self._batcher.start()
        self._monitor: SystemMonitor | None = None
        if self._sender is not None:
            self._sender.start()
            self._await_init()
        if settings.system_metrics_interval_s > 0:
            self._monitor = SystemMonitor(settings.system_metrics_interval_s, self._log_system,
                                          disk_path=settings.spool_dir)
            self._monitor.start()

    # --- hot path ----------------------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record metric values at `step`. Only appends to memory; never waits on the network."""
        if self._closed:
            raise RunClosed(f"run {self.run_id} is finished (or belongs to a parent process)")
        if step is None:
            step = self._step + 1
        self._step = step
        entries = self._entries
        entries.append((METRICS, step, _time(), dict(metrics)))
        queued = len(entries)
        if queued == 1 or queued >= self._nudge_at:
            self._batcher.nudge(queued)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record run parameters (write-once on the server; the same value again is fine)."""
        self._append(PARAMS, params)

    def log_tags(self, tags: Mapping[str, Any]) -> None:
        self._append(TAGS, tags)

    def log_artifact(self, path: str | os.PathLike[str], name: str | None = None,
                     type: str = "file", *, wait: bool = False) -> ArtifactUpload:
        """Upload the file at `path` as an artifact of this run (`name` defaults to the file
        name), on a background thread; `wait=True` blocks until it is finalized and raises
        `ArtifactUploadFailed` if it failed. Otherwise follow the returned handle."""
        from mlrun.sdk.artifacts import ArtifactUploader

        file = Path(path)
        if not file.is_file():
            raise InvalidArgument(f"log_artifact: {str(file)!r} is not a readable file")
        with self._finish_lock:
            if self._closed:
                raise RunClosed(f"run {self.run_id} is finished")
            if self._uploader is None:
                self._uploader = ArtifactUploader(self.run_id, self.settings)
            handle = self._uploader.submit(file, name or file.name, type)
        if wait:
            handle.wait()
        return handle

    def _append(self, kind: int, payload: Mapping[str, Any]) -> None:
        if self._closed:
            raise RunClosed(f"run {self.run_id} is finished")
        self._entries.append((kind, 0, _time(), dict(payload)))
        self._batcher.nudge(len(self._entries))

    def _log_system(self, values: dict[str, float]) -> None:
        if not self._closed:
            self._entries.append((SYSTEM, self._system_step, _time(), values))
            self._system_step += 1
            self._batcher.nudge(len(self._entries))

    # --- flush, finish, statistics -----------------------------------------------------------

    def flush(self, timeout_s: float | None = None) -> bool:
        """Send what was logged so far. True when the server acknowledged all of it; False
        when, at the deadline (default `finish_timeout_s`), part of it was only made durable
        in the spool instead."""
        if self._closed:
            return self._outbox.pending_counts()[0] == 0
        deadline = time.monotonic() + (self.settings.finish_timeout_s if timeout_s is None
                                       else timeout_s)
        request = FlushRequest()
        self._entries.append((FLUSH, 0, 0.0, request))
        self._batcher.wake()
        if not request.done.wait(max(0.0, deadline - time.monotonic())):
            return False
        if self._sender is not None and self._outbox.wait_settled(
                request.pos, deadline - time.monotonic()):
            return True
        self._outbox.spill(request.pos)
        return False

    def finish(self, status: FinalStatus = "finished", timeout_s: float | None = None) -> None:
        """Mark the run `status` (finished | failed | killed) and deliver what is left, within
        `timeout_s` (default `finish_timeout_s`); what is not delivered by then stays in the
        spool for `mlrun sync`. Artifact uploads in flight are waited for (within the same
        deadline) before the status is sent, so a run seen finished has all its artifacts.
        A second call does nothing."""
        if status not in get_args(FinalStatus):
            raise InvalidArgument(f"status: expected one of {get_args(FinalStatus)}, got "
                                  f"{status!r}")
        with self._finish_lock:
            if self._closed:
                return
            self._closed = True
        _unregister(self)
        deadline = time.monotonic() + (self.settings.finish_timeout_s if timeout_s is None
                                       else timeout_s)
        if self._monitor is not None:
            self._monitor.stop(_STOP_JOIN_S)
        if self._uploader is not None:
            # Artifacts in flight first: the run is marked finished only once they are
            # finalized, so whoever sees the status sees every artifact too. Uploads and the
            # sender's deliveries of what was logged before progress together meanwhile.
            self._batcher.wake()
            late = self._uploader.close(deadline - time.monotonic())
            if late:
                logger.warning("mlrun: run %s: %d artifact uploads did not complete before the "
                               "finish deadline and were cancelled: %s", self.run_id, len(late),
                               ", ".join(repr(h.name) for h in late))
        self._entries.append((FINISH, 0, 0.0, FinishOp(run_id=self.run_id,
                                                       request=FinishRun(status=status))))
        self._batcher.wake()
        # The batcher never waits on the network, so it gets its few moments (to form the last
        # batch and queue the finish) even when the deadline has passed already.
        self._batcher.join(max(deadline - time.monotonic(), _BATCHER_JOIN_S))
        if self._sender is not None:
            self._outbox.wait_settled(self._outbox.last_pos, deadline - time.monotonic())
        self._shutdown()

    def _shutdown(self) -> None:
        """Stop the threads, make whatever is pending durable, release the spool."""
        sender_stopped = True
        if self._sender is not None:
            self._sender.stop()
            sender_stopped = self._sender.join(_STOP_JOIN_S)
        self._outbox.close()
        self._outbox.spill()
        pending, _ = self._outbox.pending_counts()
        if self._transport is not None and sender_stopped:
            self._transport.close()  # else the sender still uses it; its daemon thread ends it
        directory = self._spool.directory
        removed = self._spool.close(remove_if_empty=pending == 0)
        if pending:
            logger.warning("mlrun: run %s: %d operations were not delivered; they are kept in "
                           "%s — `mlrun sync %s` replays them", self.run_id, pending, directory,
                           directory)
        elif not removed:
            logger.warning("mlrun: run %s: %s keeps dead letters or damaged files; see its dead/ "
                           "and corrupt/ folders", self.run_id, directory)

    def statistics(self) -> RunStatistics:
        c = self._counters
        pending, spooled = self._outbox.pending_counts()
        return RunStatistics(
            logged_points=c.logged_points, coalesced_points=c.coalesced_points,
            invalid_points=c.invalid_points, batches_formed=c.batches_formed,
            batches_delivered=c.batches_delivered, points_delivered=c.points_delivered,
            duplicate_batches=c.duplicate_batches, retries=c.retries,
            overloaded_responses=c.overloaded_responses, transient_errors=c.transient_errors,
            server_warnings=c.server_warnings, spilled_batches=c.spilled_batches,
            pending_operations=pending, spooled_operations=spooled,
            dead_lettered=c.dead_lettered, dropped_batches=c.dropped_batches,
            dropped_points=c.dropped_points, log_stalls=c.log_stalls,
            offline=self._outbox.offline, spool_dir=str(self._spool.directory),
        )

    @property
    def finished(self) -> bool:
        return self._closed

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.finish("finished")
        else:
            self.finish("killed" if issubclass(exc_type, KeyboardInterrupt) else "failed")

    def __repr__(self) -> str:
        return f"<mlrun.Run {self.run_id} project={self.project!r}>"

    # --- init --------------------------------------------------------------------------------

    def _await_init(self) -> None:
        assert self._sender is not None
        answered = self._sender.init_resolved.wait(self.settings.init_timeout_s)
        outcome = self._sender.init_outcome
        if not answered or outcome is None:
            logger.warning("mlrun: no answer from the server yet; logging goes on and run %s is "
                           "created when the server answers (or by `mlrun sync`)", self.run_id)
            return
        if isinstance(outcome, Rejected):
            self._closed = True
            self._batcher.stop()
            self._shutdown_quietly()
            raise RunRejected(outcome.status, outcome.code, outcome.message)
        if outcome.run_name:
            self.name = outcome.run_name

    def _shutdown_quietly(self) -> None:
        assert self._sender is not None and self._transport is not None
        self._sender.stop()
        if self._sender.join(_STOP_JOIN_S):
            self._transport.close()
        directory = self._spool.directory
        self._spool.close(remove_if_empty=False)
        # Nothing was logged yet, and the refused creation is the caller's to fix: no spool.
        shutil.rmtree(directory, ignore_errors=True)


def _init_request(
    project: str,
    name: str | None,
    run_id: str,
    tags: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> InitRun:
    """The InitRun payload, validated against the wire schema before anything is sent."""
    raw = {
        "project": project,
        "name": name,
        "run_id": run_id,
        "tags": {str(k): str(v) for k, v in (tags or {}).items()} or None,
        "config": _flatten(config) if config else None,
    }
    try:
        return _init_validator.decode(msgspec.json.encode(raw))
    except msgspec.ValidationError as exc:
        raise InvalidArgument(f"mlrun.init: {exc}") from None


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, ScalarValue | None]:
    """Nested mappings become dotted keys ({"opt": {"lr": 0.1}} -> {"opt.lr": 0.1}); values the
    wire cannot carry as scalars become JSON text."""
    out: dict[str, ScalarValue | None] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        elif value is None or isinstance(value, str | bool | int):
            out[name] = value
        elif isinstance(value, float):
            out[name] = value if value == value and abs(value) != float("inf") else str(value)
        else:
            try:
                out[name] = msgspec.json.encode(value).decode()
            except (TypeError, msgspec.EncodeError):
                out[name] = str(value)
    return out


# --- the active run and the exit hook -----------------------------------------------------------

_registry_lock = threading.Lock()
_live_runs: dict[int, Run] = {}
_active: Run | None = None
_atexit_installed = False


def _register(run: Run) -> None:
    global _active, _atexit_installed
    with _registry_lock:
        _live_runs[id(run)] = run
        _active = run
        if not _atexit_installed:
            atexit.register(_finish_live_runs)
            _atexit_installed = True


def _unregister(run: Run) -> None:
    global _active
    with _registry_lock:
        _live_runs.pop(id(run), None)
        if _active is run:
            _active = None


def _forget_runs_in_child() -> None:
    """After fork, the child has the parent's runs but none of their threads: logging there
    would go nowhere, so the child's copies are closed (log() raises RunClosed) and its exit
    does not finish the parent's runs."""
    global _active, _registry_lock
    _registry_lock = threading.Lock()  # another thread may have held it at the fork
    for run in _live_runs.values():
        run._closed = True
    _live_runs.clear()
    _active = None


os.register_at_fork(after_in_child=_forget_runs_in_child)


def _finish_live_runs() -> None:
    """At interpreter exit: finish what the program left open. An uncaught exception (the
    interpreter sets sys.last_value before atexit hooks run) marks the runs failed."""
    last = getattr(sys, "last_value", None)
    status: FinalStatus = "finished"
    if isinstance(last, KeyboardInterrupt):
        status = "killed"
    elif last is not None:
        status = "failed"
    with _registry_lock:
        runs = list(_live_runs.values())
    for run in runs:
        run.finish(status)


def init(
    project: str,
    name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    **options: Any,
) -> Run:
    """Start (or resume, with an existing `run_id`) a run and make it the active one.

    `options` override settings by name (server_url, api_key, transport, offline, spool_dir,
    max_batch_points, system_metrics_interval_s, ...; see `mlrun.sdk.settings`)."""
    if settings is None:
        settings = Settings.load(**options)
    elif options:
        settings = Settings.load(**{**_as_overrides(settings), **options})
    return Run(project, name=name, run_id=run_id, tags=tags, config=config, settings=settings)


def _as_overrides(settings: Settings) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in Settings.__dataclass_fields__}


def active_run() -> Run | None:
    return _active


def _require_active() -> Run:
    run = _active
    if run is None:
        raise RunClosed("no active run: call mlrun.init(...) first")
    return run


def log(metrics: Mapping[str, Any], step: int | None = None) -> None:
    _require_active().log(metrics, step)


def log_params(params: Mapping[str, Any]) -> None:
    _require_active().log_params(params)


def log_tags(tags: Mapping[str, Any]) -> None:
    _require_active().log_tags(tags)


def log_artifact(path: str | os.PathLike[str], name: str | None = None, type: str = "file",
                 *, wait: bool = False) -> ArtifactUpload:
    return _require_active().log_artifact(path, name, type, wait=wait)


def flush(timeout_s: float | None = None) -> bool:
    return _require_active().flush(timeout_s)


def finish(status: FinalStatus = "finished", timeout_s: float | None = None) -> None:
    run = _active
    if run is not None:
        run.finish(status, timeout_s)
