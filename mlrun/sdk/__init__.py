"""The Python SDK (client side): thread-based, because training code is synchronous.

    log() ──deque──► batcher thread ──► outbox (memory ⇄ spool on disk) ──► sender thread ──► server
                     (batcher.py)       (outbox.py, spool.py)                (sender.py, retry.py,
                                                                              transport_http.py,
                                                                              transport_grpc.py)

- run.py: `Run` and the module-level API (`mlrun.init`, `log`, `finish`, ...), exit hook.
- batcher.py: coalescing, count/bytes/age triggers, local validation, batch identity.
- ops.py: the operations delivered (create run, batch, finish) and their disk encoding.
- outbox.py / spool.py: one ordered queue across memory and crash-safe spool files.
- sender.py / retry.py / transport*.py: delivery, backpressure-aware retries, HTTP and gRPC.
- sync_command.py: `mlrun sync [DIR]`, replaying spools of finished or crashed processes.
- system_monitor.py: opt-in CPU, memory, disk, network (and GPU via NVML) metrics.
- settings.py, statistics.py, errors.py: configuration, counters, exceptions (the RetryInfo
  reader is shared with the server: `mlrun.wire.rpc_status`).

Must not import `mlrun.server`; httpx and grpc are imported only when a transport is opened.
"""
