"""The README's SDK quickstart, run as a new user would: its Python block, verbatim, in a fresh
process configured only by the environment variables the README names, against a live server on
real backends; then everything it logged is read back through the read API. And the offline
path the README describes: `MLRUN_OFFLINE=true`, then `mlrun sync`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(240)
ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- quickstart:"
AUTH = {"Authorization": f"Bearer {TEST_API_KEY}"}


def quickstart_code() -> str:
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index(MARKER):]
    found = re.search(r"```python\n(.*?)```", after, re.DOTALL)
    assert found is not None, "the README lost its quickstart block"
    return found.group(1)


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MLRUN_")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def read_run(server: ServerProcess, run_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.base_url}/api/v1/runs/{run_id}", headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    run: dict[str, Any] = answer.json()
    return run


def test_the_readme_quickstart_runs_and_stores_what_it_logged(
    server: ServerProcess, tmp_path: Path
) -> None:
    done = run_python(quickstart_code(), tmp_path, MLRUN_SERVER_URL=server.base_url,
                      MLRUN_API_KEY=TEST_API_KEY, MLRUN_SPOOL_DIR=str(tmp_path / "spool"))
    assert done.returncode == 0, done.stderr[-3000:]
    run_id = done.stdout.strip().splitlines()[-1]
    run = read_run(server, run_id)
    assert (run["project"], run["name"], run["status"]) == ("quickstart", "first-run", "finished")
    assert run["params"] == {"lr": "0.001", "optimizer": "adam", "epochs": "100"}
    assert run["tags"] == {"team": "vision", "stage": "baseline"}
    summaries = {s["name"]: s for s in run["metrics_summary"]}
    assert summaries["train/loss"]["count"] == summaries["train/acc"]["count"] == 100
    assert summaries["train/loss"]["last_value"] == pytest.approx(0.01)
    artifacts = httpx.get(f"{server.base_url}/api/v1/runs/{run_id}/artifacts", headers=AUTH,
                          timeout=10).json()["artifacts"]
    assert [(a["name"], a["size_bytes"]) for a in artifacts] == [("model.txt", 7)]


OFFLINE_TRAINING = """
import mlrun
with mlrun.init(project="offline", config={"lr": 0.1}) as run:
    for step in range(50):
        run.log({"loss": 1.0 / (step + 1)}, step=step)
print(run.run_id)
"""


def test_offline_then_mlrun_sync_stores_the_run_once(server: ServerProcess, tmp_path: Path
                                                     ) -> None:
    spool = tmp_path / "spool"
    env = {"MLRUN_SERVER_URL": server.base_url, "MLRUN_API_KEY": TEST_API_KEY,
           "MLRUN_SPOOL_DIR": str(spool)}
    offline = run_python(OFFLINE_TRAINING, tmp_path, MLRUN_OFFLINE="true", **env)
    assert offline.returncode == 0, offline.stderr[-3000:]
    run_id = offline.stdout.strip().splitlines()[-1]
    missing = httpx.get(f"{server.base_url}/api/v1/runs/{run_id}", headers=AUTH, timeout=10)
    assert missing.status_code == 404  # nothing left the machine
    for _ in range(2):  # a second sync finds nothing left, and stores nothing twice
        synced = subprocess.run([sys.executable, "-m", "mlrun", "sync"], cwd=tmp_path,
                                env={**os.environ, **env}, capture_output=True, text=True,
                                timeout=120, check=False)
        assert synced.returncode == 0, synced.stderr[-3000:]
    run = read_run(server, run_id)
    assert (run["project"], run["status"], run["params"]) == ("offline", "finished",
                                                              {"lr": "0.1"})
    assert [(s["name"], s["count"]) for s in run["metrics_summary"]] == [("loss", 50)]
