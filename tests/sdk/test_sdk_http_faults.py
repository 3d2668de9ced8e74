"""The SDK over HTTP against faults injected on cue (tests/sdk/fault_server.py): 429 with
Retry-After, 503, dropped connections, refusals, an unreachable server, a stuck server, and
`mlrun sync`. These test the client's behaviour; storage end to end is test_sdk_e2e.py."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fault_server import (
    Fault,
    FaultServer,
    closed_port_url,
    overloaded,
    rejected,
    unavailable,
    wait_until,
)

import mlrun
from mlrun.sdk.errors import RunRejected
from mlrun.sdk.ops import BatchOp, decode_dead_letter
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import unframe
from mlrun.sdk.sync_command import sync_command

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fake() -> Any:
    server = FaultServer().start()
    yield server
    server.stop()


def settings_for(url: str, spool_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "server_url": url, "spool_dir": spool_dir, "backoff_base_s": 0.01,
        "backoff_max_s": 0.1, "offline_after_s": 0.5, "max_batch_age_s": 0.02,
        "max_batch_points": 1000, "request_timeout_s": 2.0, "init_timeout_s": 5.0,
        "finish_timeout_s": 20.0, **overrides,
    }
    return Settings.load(environ={}, **values)


def log_steps(run: mlrun.Run, steps: range) -> None:
    for step in steps:
        run.log({"loss": step * 0.5}, step=step)


def assert_exactly_once(fake: FaultServer, run_id: str, steps: int) -> None:
    ids = [b["batch_id"] for b in fake.accepted]
    assert len(ids) == len(set(ids))
    stored = Counter((b["run_id"], s) for b in fake.accepted for series in b["series"]
                     for s in series["steps"])
    assert stored == Counter({(run_id, s): 1 for s in range(steps)})


def test_429_waits_the_servers_delay_and_retries_the_same_batch(
    fake: FaultServer, tmp_path: Path
) -> None:
    fake.inject(overloaded(1), overloaded(1))
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path))
    log_steps(run, range(5000))
    run.finish()
    assert_exactly_once(fake, run.run_id, 5000)
    first_id = fake.attempts[0][0]
    tries = [at for batch_id, at in fake.attempts if batch_id == first_id]
    assert len(tries) == 3  # the SAME batch, twice refused, then stored
    assert tries[1] - tries[0] >= 1.0 and tries[2] - tries[1] >= 1.0  # waited as told
    stats = run.statistics()
    assert stats.overloaded_responses == 2 and stats.retries == 2
    assert stats.points_delivered == 5000 and stats.pending_operations == 0
    assert fake.finished == {run.run_id: "finished"}
    assert not any(tmp_path.iterdir())  # nothing left: the run's spool dir is removed


def test_503_and_dropped_connections_retry_with_the_same_batch_id(
    fake: FaultServer, tmp_path: Path
) -> None:
    fake.inject(unavailable(), Fault("drop_before"), Fault("drop_after"), unavailable())
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path))
    log_steps(run, range(3000))
    run.finish()
    assert_exactly_once(fake, run.run_id, 3000)
    stats = run.statistics()
    assert stats.transient_errors == 4
    # The batch stored before the connection dropped came back as a duplicate, not twice.
    assert stats.duplicate_batches == 1
    assert len(fake.attempts) == len(fake.accepted) + 4


def test_a_refused_batch_is_dead_lettered_and_reported_once(
    fake: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake.inject(rejected(409, "batch_conflict"), rejected(409, "batch_conflict"))
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path, max_batch_points=100))
    log_steps(run, range(1000))
    with caplog.at_level(logging.WARNING):
        run.finish()
    stats = run.statistics()
    assert stats.dead_lettered == 2 and stats.points_delivered == 800
    assert len(fake.attempts) == 10  # refused batches are not retried
    reports = [r for r in caplog.records if "batch_conflict" in r.getMessage()]
    assert len(reports) == 1
    dead = sorted(Path(stats.spool_dir, "dead").iterdir())
    letters = [decode_dead_letter(unframe(path.read_bytes())) for path in dead]
    assert [(letter.status, letter.code) for letter in letters] == [("HTTP 409",
                                                                    "batch_conflict")] * 2
    kept = sum(len(s.steps) for letter in letters if isinstance(letter.op, BatchOp)
               for s in letter.op.request.series)
    assert kept == 200  # nothing thrown away: 800 delivered + 200 kept


def test_server_down_spools_then_drains_in_order_when_back(tmp_path: Path) -> None:
    fake = FaultServer().start()
    port = fake.port
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path, max_queued_batches=2))
    log_steps(run, range(1000))
    assert run.flush(10)
    fake.stop()  # the server goes away mid-run
    log_steps(run, range(1000, 6000))
    wait_until(lambda: run.statistics().offline, 10, "the run to go offline")
    log_steps(run, range(6000, 9000))
    assert run.flush(10) is False  # durable in the spool, not delivered
    spooled = run.statistics().spooled_operations
    assert spooled >= 5
    back = FaultServer(port).start()  # same address: the probe notices by itself
    try:
        wait_until(lambda: run.statistics().pending_operations == 0, 20, "the spool to drain")
        assert not run.statistics().offline
        log_steps(run, range(9000, 10_000))
        run.finish()
        delivered = fake.accepted + back.accepted
        seqs = [b["seq"] for b in delivered]
        assert seqs == sorted(seqs)  # replayed in order, before anything newer
        fake.accepted = delivered
        assert_exactly_once(fake, run.run_id, 10_000)
    finally:
        back.stop()


def test_init_refused_raises_and_leaves_no_spool(fake: FaultServer, tmp_path: Path) -> None:
    fake.init_status = 401
    with pytest.raises(RunRejected) as info:
        mlrun.init("p", settings=settings_for(fake.url, tmp_path))
    assert info.value.status == "HTTP 401" and info.value.code == "unauthenticated"
    assert not any(tmp_path.iterdir())


def test_context_manager_marks_failed_and_reraises(fake: FaultServer, tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), mlrun.init(
            "p", settings=settings_for(fake.url, tmp_path)) as run:
        run.log({"loss": 1.0})
        _ = 1 / 0
    assert fake.finished == {run.run_id: "failed"}
    assert fake.points() == 1


def test_module_level_api_and_heartbeats(fake: FaultServer, tmp_path: Path) -> None:
    run = mlrun.init("p", name="n", tags={"team": "cv"}, config={"opt": {"lr": 0.1}},
                     settings=settings_for(fake.url, tmp_path, heartbeat_interval_s=0.05))
    assert mlrun.active_run() is run and run.name == "n"
    mlrun.log({"loss": 1.0})
    mlrun.log({"loss": 0.5})  # auto step: 1
    mlrun.log_params({"seed": 7})
    mlrun.log_tags({"stage": "train"})
    wait_until(lambda: fake.heartbeats >= 2, 10, "heartbeats while idle")
    mlrun.finish()
    assert mlrun.active_run() is None
    assert fake.runs[run.run_id]["config"] == {"opt.lr": 0.1}
    assert fake.runs[run.run_id]["tags"] == {"team": "cv"}
    (series,) = [s for b in fake.accepted for s in b["series"]]
    assert series["steps"] == [0, 1]
    assert [p for b in fake.accepted for p in b["params"]] == [{"name": "seed", "value": 7}]
    assert [t for b in fake.accepted for t in b["tags"]] == [{"key": "stage", "value": "train"}]
    with pytest.raises(mlrun.RunClosed):
        run.log({"loss": 1.0})


def test_finish_has_a_deadline_and_sync_replays_the_rest_exactly_once(
    fake: FaultServer, tmp_path: Path
) -> None:
    fake.inject(Fault("hang", seconds=30))  # the first batch gets stuck in the server
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path))
    log_steps(run, range(4000))
    run.finish(timeout_s=1.0)  # returns at its deadline; what is left stays durable
    spool_dir = Path(run.statistics().spool_dir)
    assert spool_dir.is_dir() and run.statistics().pending_operations >= 4
    fake.release.set()  # the stuck request completes now (and is stored once)
    wait_until(lambda: len(fake.accepted) >= 1, 10, "the stuck batch")
    assert sync_command(tmp_path, settings=settings_for(fake.url, tmp_path)) == 0
    assert_exactly_once(fake, run.run_id, 4000)
    assert fake.finished == {run.run_id: "finished"}
    assert not spool_dir.exists()


def test_offline_run_is_created_at_sync_and_a_second_sync_stores_nothing(
    fake: FaultServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = mlrun.init("p", run_id="offline-run-1",
                     settings=settings_for(closed_port_url(), tmp_path, offline=True))
    log_steps(run, range(20_000))
    run.finish()
    spool_dir = Path(run.statistics().spool_dir)
    backup = tmp_path.parent / "backup"
    subprocess.run(["cp", "-a", str(spool_dir), str(backup)], check=True)
    assert fake.runs == {}
    assert sync_command(tmp_path, settings=settings_for(fake.url, tmp_path)) == 0
    assert set(fake.runs) == {"offline-run-1"} and fake.finished == {"offline-run-1": "finished"}
    assert_exactly_once(fake, "offline-run-1", 20_000)
    assert "20000 points" in capsys.readouterr().err
    # The same spool replayed again (a sync interrupted after sending, before deleting):
    # every batch is answered as a duplicate and nothing is stored twice.
    assert sync_command(backup, settings=settings_for(fake.url, tmp_path)) == 0
    assert_exactly_once(fake, "offline-run-1", 20_000)
    assert "20 batches were already stored" in capsys.readouterr().err


def test_atexit_finishes_the_run_failed_after_an_uncaught_exception(
    fake: FaultServer, tmp_path: Path
) -> None:
    script = textwrap.dedent(f"""
        import mlrun
        run = mlrun.init("p", run_id="atexit-run", server_url={fake.url!r},
                         spool_dir={str(tmp_path)!r}, max_batch_age_s=60)
        for step in range(500):
            run.log({{"loss": 1.0}}, step=step)
        raise RuntimeError("training crashed")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLRUN_")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=30, cwd=Path(__file__).parents[2], env=env)
    assert "training crashed" in result.stderr and result.returncode == 1
    assert fake.finished == {"atexit-run": "failed"}
    assert_exactly_once(fake, "atexit-run", 500)


def test_sync_can_retry_dead_letters_once_the_cause_is_fixed(
    fake: FaultServer, tmp_path: Path
) -> None:
    fake.inject(rejected(401, "unauthenticated"))  # say, a key revoked for a moment
    run = mlrun.init("p", settings=settings_for(fake.url, tmp_path, max_batch_points=500))
    log_steps(run, range(2000))
    run.finish()
    assert run.statistics().dead_lettered == 1
    assert sync_command(tmp_path, settings=settings_for(fake.url, tmp_path)) == 1  # kept
    assert sync_command(tmp_path, settings=settings_for(fake.url, tmp_path),
                        retry_dead_letters=True) == 0
    assert_exactly_once(fake, run.run_id, 2000)
    assert not any(tmp_path.iterdir())


def test_sync_against_an_unreachable_server_gives_up_and_keeps_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nowhere = closed_port_url()
    run = mlrun.init("p", settings=settings_for(nowhere, tmp_path, offline=True))
    log_steps(run, range(3000))
    run.finish()
    before = sorted(p.name for p in Path(run.statistics().spool_dir).iterdir())
    assert sync_command(tmp_path, settings=settings_for(nowhere, tmp_path), patience_s=0.3) == 1
    assert "unreachable" in capsys.readouterr().err
    assert sorted(p.name for p in Path(run.statistics().spool_dir).iterdir()) == before
