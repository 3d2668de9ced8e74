"""`mlrun keys create | list | revoke`: API key management against a running server, over HTTP.

Owns the command line of key management and nothing else: each subcommand is one request to
`/api/v1/keys` with an admin key, and prints the answer. Entry point: `keys_main(argv) -> int`
(wired into `mlrun/__main__.py` as `mlrun keys ...`).

Where things come from: the server from `--server` or `MLRUN_SERVER_URL` (default
`http://127.0.0.1:3001`); the admin key from `--api-key-file`, else `MLRUN_API_KEY`, else the
bootstrap key a server without MLRUN_API_KEY wrote to `<MLRUN_DATA_DIR>/bootstrap-api-key`
(default data dir `./mlrun-data`), so `mlrun keys list` works next to `mlrun serve` as is. A key
on the command line would be visible to every user through `ps`, so there is no flag for it.
`--server` and `--api-key-file` are accepted before or after the sub-command.

Output: `create` prints the new key alone on stdout (so `KEY=$(mlrun keys create ...)` works)
and what it is on stderr; it is the only time the key can be seen. `list` prints a table (or
JSON with `--json`), never secrets. Exit codes: 0 done, 1 the server refused or could not be
reached (its error code and message on stderr), 2 bad usage.

Must not import the server package: this is a client.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import msgspec

DEFAULT_SERVER_URL = "http://127.0.0.1:3001"
# The server's default MLRUN_DATA_DIR (mlrun.server.runtime.config; not imported: a client).
DEFAULT_DATA_DIR = "mlrun-data"
TIMEOUT_S = 15.0
SCOPES = ("read", "write", "admin")
_DURATION = re.compile(r"^(?P<n>[0-9]+)(?P<unit>[smhdw]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A bad argument; the message is one line for the user."""


class ServerError(Exception):
    """The server refused, or could not be reached; the message is one line."""


def parse_duration_s(text: str) -> int:
    """`90`, `90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    found = _DURATION.match(text.strip().lower())
    if found is None or int(found["n"]) <= 0:
        raise UsageError(f"--expires-in: expected a positive duration such as 3600, 12h or 30d,"
                         f" got {text!r}")
    return int(found["n"]) * _UNIT_S[found["unit"]]


def parse_scopes(values: Sequence[str]) -> list[str]:
    scopes: list[str] = []
    for value in values:
        for scope in value.split(","):
            scope = scope.strip().lower()
            if scope not in SCOPES:
                raise UsageError(f"--scope: expected read, write or admin, got {scope!r}")
            if scope not in scopes:
                scopes.append(scope)
    if not scopes:
        raise UsageError("--scope: give at least one of read, write, admin")
    return scopes


def _connection_options(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--server", default=default,
                        help=f"server URL (default: $MLRUN_SERVER_URL or {DEFAULT_SERVER_URL})")
    parser.add_argument("--api-key-file", type=Path, default=default,
                        help="file holding the admin key (default: $MLRUN_API_KEY, else"
                             " <MLRUN_DATA_DIR>/bootstrap-api-key)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlrun keys", description="Manage the API keys of a running MLRun server.")
    _connection_options(parser, None)
    # The same options after the sub-command (where users type them); SUPPRESS keeps a value
    # given before the sub-command when none is given after it.
    after = argparse.ArgumentParser(add_help=False)
    _connection_options(after, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", parents=[after],
                                 help="create a key and print it (shown only once)")
    create.add_argument("--name", required=True, help="what the key is for")
    create.add_argument("--scope", action="append", default=[], metavar="SCOPE",
                        help="read, write or admin (repeat, or comma-separate); admin implies all")
    create.add_argument("--project", default=None, help="limit the key to one project")
    create.add_argument("--expires-in", default=None, metavar="DURATION",
                        help="lifetime such as 3600, 12h, 30d (default: never expires)")
    create.add_argument("--json", action="store_true", help="print the whole answer as JSON")

    listing = commands.add_parser("list", parents=[after], help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    revoke = commands.add_parser("revoke", parents=[after], help="revoke a key by its id")
    revoke.add_argument("key_id")
    return parser


def _admin_key(path: Path | None) -> str:
    if path is not None:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"--api-key-file: cannot read {path}: {exc.strerror}") from exc
    else:
        key = os.environ.get("MLRUN_API_KEY", "").strip() or _bootstrap_key()
    if not key:
        raise UsageError("an admin API key is needed: set MLRUN_API_KEY, pass --api-key-file,"
                         f" or run next to the server's data dir ({_bootstrap_key_path()})")
    return key


def _bootstrap_key_path() -> Path:
    return Path(os.environ.get("MLRUN_DATA_DIR") or DEFAULT_DATA_DIR) / "bootstrap-api-key"


def _bootstrap_key() -> str:
    """The key a server without MLRUN_API_KEY generated into its data dir, if readable here."""
    try:
        return _bootstrap_key_path().read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def _request(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {client.base_url}: {type(exc).__name__}") from exc
    try:
        body = msgspec.json.decode(response.content) if response.content else None
    except msgspec.DecodeError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise ServerError(f"HTTP {response.status_code} {error.get('code')}:"
                              f" {error.get('message')}")
        raise ServerError(f"HTTP {response.status_code} from {client.base_url}")
    return body


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _create(client: httpx.Client, args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"name": args.name, "scopes": parse_scopes(args.scope)}
    if args.project:
        payload["project"] = args.project
    if args.expires_in:
        payload["expires_in_s"] = parse_duration_s(args.expires_in)
    created = _request(client, "POST", "/api/v1/keys", json=payload)
    if args.json:
        print(msgspec.json.encode(created).decode())
        return 0
    print(created["key"])
    print(
        f"created {created['key_id']} ({created['name']}): scopes {','.join(created['scopes'])},"
        f" project {created['project'] or '*'}, expires {created['expires_at'] or 'never'}."
        " Store the key now: it cannot be shown again.",
        file=sys.stderr,
    )
    return 0


def _list(client: httpx.Client, args: argparse.Namespace) -> int:
    keys = _request(client, "GET", "/api/v1/keys")["keys"]
    if args.json:
        print(msgspec.json.encode(keys).decode())
        return 0
    rows = [["KEY_ID", "NAME", "PREFIX", "SCOPES", "PROJECT", "STATUS", "CREATED", "EXPIRES",
             "LAST_USED"]]
    rows.extend(
        [key["key_id"], key["name"], key["display_prefix"] + "…", ",".join(key["scopes"]),
         key["project"] or "*", key["status"], key["created_at"], key["expires_at"] or "never",
         key["last_used_at"] or "-"]
        for key in keys
    )
    print(_table(rows))
    return 0


def _revoke(client: httpx.Client, args: argparse.Namespace) -> int:
    revoked = _request(client, "DELETE", f"/api/v1/keys/{args.key_id}")
    print(f"revoked {revoked['key_id']} ({revoked['name']}) at {revoked['revoked_at']}",
          file=sys.stderr)
    return 0


def keys_main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    server = args.server or os.environ.get("MLRUN_SERVER_URL") or DEFAULT_SERVER_URL
    try:
        headers = {"Authorization": f"Bearer {_admin_key(args.api_key_file)}"}
        with httpx.Client(base_url=server.rstrip("/"), headers=headers,
                          timeout=TIMEOUT_S) as client:
            if args.command == "create":
                return _create(client, args)
            if args.command == "list":
                return _list(client, args)
            return _revoke(client, args)
    except UsageError as exc:
        print(f"mlrun keys: {exc}", file=sys.stderr)
        return 2
    except ServerError as exc:
        print(f"mlrun keys: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover - `python -m mlrun.keys_command`
    sys.exit(keys_main())
