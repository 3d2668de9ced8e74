"""The spool: atomic files, recovery after a crash mid-write, corruption quarantine, the size
cap on every write, and the directory lock that survives kill -9 as "free"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mlrun.sdk.errors import SpoolLocked
from mlrun.sdk.spool import Spool, SpoolFull, frame, run_spool_dirs

pytestmark = pytest.mark.timeout(30)


def test_written_files_read_back_in_order(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    for pos in (2, 0, 1):
        spool.write(pos, "batch", f"payload-{pos}".encode())
    spool.close(remove_if_empty=False)

    reopened = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    entries = reopened.recover()
    assert [e.pos for e in entries] == [0, 1, 2]
    assert [reopened.read(e) for e in entries] == [b"payload-0", b"payload-1", b"payload-2"]
    assert reopened.statistics().used_bytes == sum(e.size_bytes for e in entries)


def test_crash_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    """A write interrupted before its rename leaves only a .tmp, which recovery deletes; a file
    truncated after the rename (storage that lied about fsync) fails its check and is moved
    aside. Everything else is recovered."""
    spool = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    good = spool.write(0, "batch", b"a" * 1000)
    truncated = spool.write(1, "batch", b"b" * 1000)
    spool.write(2, "batch", b"c" * 1000)
    spool.close(remove_if_empty=False)
    # The crash: a temp file cut mid-write, and a renamed file cut short.
    (tmp_path / "s" / "0000000000000003-batch.op.tmp").write_bytes(frame(b"d" * 1000)[:300])
    with truncated.path.open("r+b") as handle:
        handle.truncate(500)

    spool = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    entries = spool.recover()
    assert [e.pos for e in entries] == [0, 2]
    assert spool.read(entries[0]) == b"a" * 1000 and entries[0].path == good.path
    assert not list((tmp_path / "s").glob("*.tmp"))
    assert (tmp_path / "s" / "corrupt" / truncated.path.name).exists()
    assert spool.statistics().quarantined_files == 1


def test_a_flipped_byte_is_caught_by_the_crc(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    entry = spool.write(0, "batch", b"x" * 100)
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    assert spool.recover() == []
    assert spool.statistics().quarantined_files == 1


def test_cap_is_enforced_on_every_write_and_counted(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s", max_bytes=3000)
    spool.write(0, "batch", b"x" * 1000)
    spool.write(1, "batch", b"x" * 1000)
    with pytest.raises(SpoolFull):
        spool.write(2, "batch", b"x" * 1000)  # 3 x (1000 + header) > 3000
    assert not (tmp_path / "s" / "0000000000000002-batch.op").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))
    assert spool.statistics().refused_writes == 1
    # Control operations (run creation, finish) are tiny and exempt, so a replay can still
    # create and close the run.
    spool.write(3, "finish", b"x" * 100, exempt=True)
    # Removing a file frees its bytes.
    first = spool.recover()[0]
    spool.remove(first)
    spool.write(4, "batch", b"x" * 800)


def test_dead_letters_count_against_the_cap(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s", max_bytes=1500)
    spool.dead_letter(0, "batch", b"x" * 1000)
    with pytest.raises(SpoolFull):
        spool.write(1, "batch", b"x" * 1000)
    spool.close(remove_if_empty=True)
    assert (tmp_path / "s" / "dead").is_dir()  # not removed: it holds a dead letter
    assert Spool.open(tmp_path / "s", max_bytes=1500).recover() == []


def test_close_removes_an_empty_directory(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "s", max_bytes=1 << 20)
    entry = spool.write(0, "batch", b"x")
    spool.remove(entry)
    assert spool.close(remove_if_empty=True)
    assert not (tmp_path / "s").exists()


def test_a_live_owner_keeps_the_directory_and_kill_9_frees_it(tmp_path: Path) -> None:
    directory = tmp_path / "s"
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from mlrun.sdk.spool import Spool; "
         f"Spool.open(pathlib.Path({str(directory)!r}), max_bytes=1000); "
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parents[2],
    )
    try:
        assert owner.stdout is not None and owner.stdout.readline().strip() == b"locked"
        with pytest.raises(SpoolLocked):
            Spool.open(directory, max_bytes=1000)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        Spool.open(directory, max_bytes=1000).close(remove_if_empty=False)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


def test_run_spool_dirs_lists_oldest_first_and_accepts_one_run_dir(tmp_path: Path) -> None:
    for name in ("0000000000002.1.b", "0000000000001.1.a"):
        Spool.open(tmp_path / name, max_bytes=1000).close(remove_if_empty=False)
    (tmp_path / "unrelated").mkdir()
    assert [p.name for p in run_spool_dirs(tmp_path)] == ["0000000000001.1.a",
                                                          "0000000000002.1.b"]
    assert run_spool_dirs(tmp_path / "0000000000001.1.a") == [tmp_path / "0000000000001.1.a"]
