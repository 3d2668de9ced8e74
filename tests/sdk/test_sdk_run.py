"""The Run object without a server: settings, local validation, offline mode (everything
durable in the spool, in order), finish semantics, fork safety, and a cheap `import mlrun`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlrun
from mlrun.sdk.errors import InvalidArgument, RunClosed, SettingsError, SpoolLocked
from mlrun.sdk.ops import BatchOp, FinishOp, InitOp, Op, decode_op
from mlrun.sdk.settings import Settings
from mlrun.sdk.spool import Spool, unframe

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]


def spooled_ops(directory: Path) -> list[Op]:
    return [decode_op(unframe(p.read_bytes())) for p in sorted(directory.glob("*.op"))]


def test_settings_come_from_env_then_arguments() -> None:
    env = {"MLRUN_SERVER_URL": "http://tracker.internal:8080/", "MLRUN_TRANSPORT": "GRPC",
           "MLRUN_BATCH_MAX_POINTS": "5_000", "MLRUN_OFFLINE": "yes",
           "MLRUN_API_KEY": "secret-key-7"}
    settings = Settings.load(env, max_batch_points=7000)
    assert settings.server_url == "http://tracker.internal:8080"
    assert settings.transport == "grpc" and settings.offline
    assert settings.api_key == "secret-key-7"
    assert settings.max_batch_points == 7000  # the argument wins
    assert settings.resolved_grpc_target == "tracker.internal:50051"
    assert "secret-key-7" not in repr(settings)  # a printed config shows no key
    assert Settings.load({"MLRUN_GRPC_TARGET": "g:1"}).resolved_grpc_target == "g:1"


@pytest.mark.parametrize(
    ("env", "overrides", "named"),
    [
        ({"MLRUN_BATCH_MAX_POINTS": "lots"}, {}, "MLRUN_BATCH_MAX_POINTS"),
        ({"MLRUN_OFFLINE": "maybe"}, {}, "MLRUN_OFFLINE"),
        ({"MLRUN_TRANSPORT": "carrier-pigeon"}, {}, "MLRUN_TRANSPORT"),
        ({"MLRUN_BATCH_MAX_POINTS": "200000"}, {}, "MLRUN_BATCH_MAX_POINTS"),
        ({}, {"server_url": "ftp://x"}, "server_url"),
        ({}, {"max_batch_age_s": 0}, "max_batch_age_s"),
        ({}, {"no_such_setting": 1}, "no_such_setting"),
    ],
)
def test_a_bad_setting_is_named(env: dict[str, str], overrides: dict[str, object],
                                named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.load(env, **overrides)


def test_init_refuses_a_bad_project_before_anything_is_created(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="project"):
        mlrun.init("bad project name!", offline=True, spool_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_offline_run_keeps_everything_in_order_on_disk(tmp_path: Path) -> None:
    settings = Settings.load(environ={}, offline=True, spool_dir=tmp_path,
                             max_batch_points=1000)
    run = mlrun.init("p", run_id="offline-1", tags={"team": "cv"}, config={"lr": 0.1},
                     settings=settings)
    for step in range(2500):
        run.log({"loss": float(step)}, step=step)
    run.log_params({"seed": 1})
    assert run.flush(5) is False  # durable, not delivered: there is no server
    stats = run.statistics()
    assert stats.offline and stats.spooled_operations == 4 and stats.logged_points == 2500
    run.finish("killed")
    run.finish("finished")  # a second finish does nothing
    with pytest.raises(RunClosed):
        run.log({"loss": 1.0})
    ops = spooled_ops(Path(stats.spool_dir))
    assert isinstance(ops[0], InitOp) and ops[0].request.run_id == "offline-1"
    assert ops[0].request.config == {"lr": 0.1} and ops[0].request.tags == {"team": "cv"}
    batches = [op for op in ops if isinstance(op, BatchOp)]
    assert [op.points for op in batches] == [1000, 1000, 500]
    assert [op.request.seq for op in batches] == [0, 1, 2]
    assert batches[-1].request.params[0].name == "seed"
    assert isinstance(ops[-1], FinishOp) and ops[-1].request.status == "killed"
    assert [op.pos for op in ops] == list(range(len(ops)))


def test_finish_refuses_an_unknown_status(tmp_path: Path) -> None:
    run = mlrun.init("p", offline=True, spool_dir=tmp_path)
    with pytest.raises(InvalidArgument):
        run.finish("done")  # type: ignore[arg-type]
    run.finish()


def test_a_forked_child_cannot_log_and_does_not_hold_the_spool(tmp_path: Path) -> None:
    """A DataLoader-style fork: the child's copy of the run is closed, and a child that
    outlives its parent (killed with SIGKILL) does not keep the spool locked."""
    script = textwrap.dedent(f"""
        import os, sys, time
        import mlrun
        run = mlrun.init("p", run_id="forked", offline=True, spool_dir={str(tmp_path)!r})
        run.log({{"loss": 1.0}})
        assert run.flush(5) is False
        child = os.fork()
        if child == 0:
            try:
                run.log({{"loss": 2.0}})
                os._exit(3)
            except mlrun.RunClosed:
                os.write(1, b"child-closed\\n")  # one write of a line: atomic on a pipe
            time.sleep(60)  # outlives the parent
            os._exit(0)
        os.write(1, f"{{child}}\\n".encode())  # never interleaved with the child's line
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    child_pid = 0
    try:
        assert parent.stdout is not None
        lines = {parent.stdout.readline().strip() for _ in range(2)}
        assert "child-closed" in lines
        child_pid = int(next(line for line in lines if line.isdigit()))
        (spool_dir,) = tmp_path.iterdir()
        with pytest.raises(SpoolLocked):
            Spool.open(spool_dir, max_bytes=1 << 20)  # the parent is alive
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        Spool.open(spool_dir, max_bytes=1 << 20).close(remove_if_empty=False)  # child alive
        ops = spooled_ops(spool_dir)
        assert [type(op).__name__ for op in ops] == ["InitOp", "BatchOp"]
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child_pid:
            os.kill(child_pid, signal.SIGKILL)


def test_import_mlrun_is_cheap() -> None:
    code = ("import sys, mlrun; loaded = set(sys.modules); "
            "print(sorted(m for m in ('mlrun.sdk.run', 'httpx', 'grpc', 'mlrun.server') "
            "if m in loaded)); mlrun.Settings; print('mlrun.sdk.settings' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=30, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True"]
