"""The `mlrun` command line: `mlrun serve`, `mlrun process` (a queued-ingest processor),
`mlrun sync [DIR]`, `mlrun keys ...` and `mlrun export` / `mlrun import` (also as
`python -m mlrun ...`).

This is the only module that imports trio or hypercorn's backend modules (with
`mlrun.http_trio`, hypercorn's trio TCP server with a cheaper keep-alive timer, which it
installs for the trio backend): it picks the event loop (`--backend trio`, the default, or
`asyncio`), hands the matching hypercorn `serve` to the supervisor, and owns process
concerns: configuration errors (exit 2, one line), signals, and the shutdown deadline.

Signals: the first SIGINT/SIGTERM asks for a graceful stop (listeners stop accepting, accepted
work drains) bounded by `MLRUN_SHUTDOWN_TIMEOUT_S`; a second one, or the deadline, cancels
what is left. A signal during start-up stops at once: nothing was accepted yet.

Exit codes: 0 after a requested stop, 1 when start-up fails or the shutdown deadline is hit,
2 for a configuration error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Literal

import anyio

logger = logging.getLogger("mlrun")

Backend = Literal["trio", "asyncio"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlrun", description="MLRun experiment tracking")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the tracking server (HTTP and gRPC)",
        description="Run the tracking server. Configuration comes from the environment; "
        "see the README for the variables. Unset backends use the embedded default.",
    )
    serve.add_argument(
        "--backend",
        choices=("trio", "asyncio"),
        default="trio",
        help="event loop to run on (default: trio)",
    )
    sync = commands.add_parser(
        "sync",
        help="replay the offline spools of finished or crashed training processes",
        description="Replay spooled batches to the server (MLRUN_SERVER_URL, MLRUN_API_KEY), "
        "exactly once: every batch keeps its batch_id. Exit 0 when everything was replayed.",
    )
    sync.add_argument("directory", nargs="?", default=None,
                      help="a spool root or one run's spool directory (default: MLRUN_SPOOL_DIR)")
    sync.add_argument("--retry-dead-letters", action="store_true",
                      help="also resend batches the server refused before (e.g. after fixing a "
                      "revoked key)")
    process = commands.add_parser(
        "process",
        help="run a queued-ingest processor (INGEST_MODE=queued): Redis streams -> ClickHouse",
        description="Consume the ingest queue's Redis streams into ClickHouse, as one member of "
        "the processors' consumer group. Same configuration as `mlrun serve`; its /health, "
        "/ready and /metrics are on PROCESSOR_HTTP_PORT.",
    )
    process.add_argument("--backend", choices=("trio", "asyncio"), default="trio",
                         help="event loop to run on (default: trio)")
    for name, text in (("export", "write runs, their points and manifests to a file"),
                       ("import", "load an export file into this deployment's storage")):
        commands.add_parser(name, help=f"{text} (mlrun {name} --help)", add_help=False)
    commands.add_parser(
        "keys",
        help="create, list or revoke API keys on a running server (mlrun keys --help)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:  # its own parser, with its own sub-commands and --help
        from mlrun.keys_command import keys_main

        return keys_main(argv[1:])
    if argv[:1] in (["export"], ["import"]):  # their own parsers; they open storage themselves
        from mlrun.server.runtime.archive_command import archive_main

        return archive_main(argv[0], argv[1:])
    args = _parser().parse_args(argv)
    if args.command in ("serve", "process"):
        return _serve_command(args.backend, processor=args.command == "process")
    if args.command == "sync":
        from mlrun.sdk.sync_command import sync_command

        return sync_command(args.directory, retry_dead_letters=args.retry_dead_letters)
    raise AssertionError(f"unhandled command {args.command}")


def _serve_command(backend: Backend, *, processor: bool = False) -> int:
    from mlrun.server.errors import ConfigError
    from mlrun.server.runtime.config import check_processor_config, load_config
    from mlrun.server.runtime.logs import configure_logging

    try:
        config = load_config()
        if processor:
            check_processor_config(config)
    except ConfigError as exc:
        print(f"mlrun: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)
    serve_http = _hypercorn_serve(backend)
    try:
        return anyio.run(_run_server, config, serve_http, processor, backend=backend)
    except KeyboardInterrupt:  # a SIGINT that arrived before the signal receiver was installed
        return 0


def _hypercorn_serve(backend: Backend) -> Callable[..., Coroutine[Any, Any, None]]:
    if backend == "trio":
        from hypercorn.trio import serve as trio_serve

        from mlrun import http_trio

        http_trio.install()

        async def serve_http_trio(
            app: Any, config: Any, trigger: Callable[[], Awaitable[None]]
        ) -> None:
            await trio_serve(app, config, shutdown_trigger=trigger)

        return serve_http_trio

    from hypercorn.asyncio import serve as asyncio_serve

    async def serve_http_asyncio(
        app: Any, config: Any, trigger: Callable[[], Awaitable[None]]
    ) -> None:
        await asyncio_serve(app, config, shutdown_trigger=trigger)

    return serve_http_asyncio


async def _run_server(config: object, serve_http: Callable[..., Coroutine[Any, Any, None]],
                      processor: bool = False) -> int:
    from mlrun.server.runtime.config import Config
    from mlrun.server.runtime.processor import serve_processor
    from mlrun.server.runtime.supervisor import StartupError, serve

    assert isinstance(config, Config)
    run = serve_processor if processor else serve
    shutdown_requested = anyio.Event()
    started = False
    deadline_hit = False

    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal deadline_hit
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not started:
                        logger.info("%s during start-up: stopping", name)
                        tg.cancel_scope.cancel()
                        return
                    if shutdown_requested.is_set():
                        logger.warning("second %s: stopping now", name)
                        deadline_hit = True
                        tg.cancel_scope.cancel()
                        return
                    logger.info("%s: graceful shutdown (deadline %.0fs)", name,
                                config.shutdown_timeout_s)
                    shutdown_requested.set()
                    tg.cancel_scope.deadline = anyio.current_time() + config.shutdown_timeout_s

        async def run_serve(*, task_status: anyio.abc.TaskStatus[object]) -> None:
            try:
                await run(
                    config,
                    serve_http=serve_http,
                    shutdown_requested=shutdown_requested,
                    task_status=task_status,
                )
            finally:
                tg.cancel_scope.cancel()  # serve ended (normally or not): stop the watcher

        tg.start_soon(watch_signals)
        try:
            await tg.start(run_serve)
        except StartupError as exc:
            logger.error("start-up failed: %s", exc)
            tg.cancel_scope.cancel()
            return 1
        started = True

    if tg.cancel_scope.cancelled_caught and shutdown_requested.is_set() and _deadline_passed(tg):
        deadline_hit = True
    if deadline_hit:
        logger.error("shutdown did not finish in time; stopped what was left")
        return 1
    return 0


def _deadline_passed(tg: anyio.abc.TaskGroup) -> bool:
    return anyio.current_time() >= tg.cancel_scope.deadline


if __name__ == "__main__":
    sys.exit(main())
