"""The Containerfile and compose example, tested without a container engine.

No image can be built on these machines, so what can be checked is checked: the Containerfile's
own install step (scripts/container-install.sh) and its ENTRYPOINT, replayed in a fresh
virtualenv from a clean copy of the tracked sources, with the image's ENV, serve /health; and
compose.yaml only sets variables the server reads, with every secret coming from the env file.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from mlrun.server.runtime.config import known_variables

from server_process import wait_for_exit

REPO = Path(__file__).resolve().parent.parent


def containerfile_final_stage() -> tuple[dict[str, str], list[str]]:
    """(ENV of the final stage, ENTRYPOINT) parsed from the Containerfile."""
    text = REPO.joinpath("Containerfile").read_text()
    text = text.replace("\\\n", " ")
    final = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    for line in final.splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
        if line.startswith("ENTRYPOINT "):
            entrypoint = yaml.safe_load(line[len("ENTRYPOINT "):])
    return env, entrypoint


def test_compose_sets_only_known_variables_and_no_literal_secrets() -> None:
    compose = yaml.safe_load(REPO.joinpath("deploy/compose.yaml").read_text())
    server_env = compose["services"]["mlrun"]["environment"]
    unknown = set(server_env) - known_variables()
    assert not unknown, f"compose sets variables the server never reads: {unknown}"
    for name in ("MLRUN_API_KEY", "CLICKHOUSE_PASSWORD", "MINIO_SECRET_KEY"):
        assert str(server_env[name]).startswith("${"), f"{name} must come from the env file"
    example = REPO.joinpath("deploy/example.env").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)", REPO.joinpath("deploy/compose.yaml").read_text()))
    defined = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    assert referenced <= defined, f"env file lacks {referenced - defined}"
    for name, service in compose["services"].items():
        if name not in ("mlrun", "minio-init"):
            assert "healthcheck" in service, f"{name} has no healthcheck"
    assert compose["services"]["mlrun"]["depends_on"]["minio-init"] == {
        "condition": "service_completed_successfully"}


def test_containerfile_env_is_known_and_final_stage_is_lean() -> None:
    env, entrypoint = containerfile_final_stage()
    assert set(env) - {"PATH"} <= known_variables()
    assert entrypoint == ["mlrun", "serve"]
    text = REPO.joinpath("Containerfile").read_text()
    final = text.split("\nFROM ")[-1]
    assert "USER mlrun" in final and "HEALTHCHECK" in final
    assert "EXPOSE 3001 50051" in final
    assert not re.search(r"\b(gcc|build-essential|pytest)\b", final)


@pytest.mark.timeout(600)
def test_containerfile_install_and_start_replayed_outside_a_container(tmp_path: Path) -> None:
    # A clean directory holding exactly the tracked sources the image's COPY lines take.
    source = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "pyproject.toml", "README.md", "mlrun", "sql",
                              "scripts/container-install.sh"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    # Outside pytest's tmp_path (its parents are mode 700 when run as root, and the embedded
    # PostgreSQL's user must reach the venv and the data); removed at the end: ~1 GB a run.
    prefix = Path(tempfile.mkdtemp(prefix="mlrun-image-"))
    workdir = Path(tempfile.mkdtemp(prefix="mlrun-image-data-"))
    workdir.chmod(0o755)
    try:
        _install_and_start(source, prefix, workdir, tmp_path)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _install_and_start(source: Path, prefix: Path, workdir: Path, tmp_path: Path) -> None:
    prefix.chmod(0o755)  # the embedded PostgreSQL's user must reach the venv (we run as root)
    shutil.rmtree(prefix)
    install = subprocess.run(["sh", "scripts/container-install.sh", str(prefix), str(source)],
                             cwd=source, timeout=540, capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    env, entrypoint = containerfile_final_stage()
    env.update({
        "PATH": f"{prefix}/bin:/usr/bin:/bin",
        "API_HOST": "127.0.0.1",  # the image binds 0.0.0.0; a test stays on loopback
        "API_HTTP_PORT": "0", "API_GRPC_PORT": "0",
        "MLRUN_DATA_DIR": str(workdir / "data"),
    })
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([str(prefix / "bin" / entrypoint[0]), *entrypoint[1:]],
                                   env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline and process.poll() is None:
            found = re.search(r"HTTP listening on http://127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(found[1]) if found else None
            time.sleep(0.1)  # waiting for a child process to come up: bounded by the deadline
        assert port is not None, log_path.read_text()[-3000:]
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
        # the web UI's files are inside the installed package (not only in the source tree)
        for path in ("/", "/ui/js/main.js", "/ui/vendor/uPlot.iife.min.js"):
            assert httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 200, path
        assert '"level":"info"' in log_path.read_text()  # MLRUN_LOG_FORMAT=json from the image
    finally:
        process.terminate()
        assert wait_for_exit(process, timeout_s=15) == 0, log_path.read_text()[-3000:]
