"""log() never waits on the network: with the sender stuck inside a request that does not
return, a training loop still logs everything, memory stays bounded (formed batches spill to
the spool), and once the server answers every point arrives exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from fault_server import Fault, FaultServer, wait_until

import mlrun
from mlrun.sdk.settings import Settings

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fake() -> Any:
    server = FaultServer().start()
    yield server
    server.stop()


def test_log_never_blocks_while_the_sender_is_stuck(fake: FaultServer, tmp_path: Path) -> None:
    settings = Settings.load(environ={}, server_url=fake.url, spool_dir=tmp_path,
                             max_batch_points=1000, max_queued_batches=4, max_batch_age_s=0.05,
                             request_timeout_s=60.0, finish_timeout_s=60.0)
    run = mlrun.init("p", settings=settings)
    fake.inject(Fault("hang", seconds=60))  # the first batch request never returns (until told)
    points = 200_000
    for step in range(points):
        run.log({"loss": step * 0.001, "acc": 0.5}, step=step)
    # The loop above finished while the sender was still blocked inside its first request.
    assert not fake.release.is_set() and fake.accepted == []
    assert len(fake.attempts) == 1
    run.flush(timeout_s=0.5)  # bounded: makes everything durable, returns False
    stats = run.statistics()
    assert stats.batches_delivered == 0
    assert stats.logged_points == 2 * points
    # Memory held at most 4 formed batches; the rest went to disk instead of growing memory.
    assert stats.spilled_batches >= stats.batches_formed - 4 - 1
    assert stats.dropped_batches == 0 and stats.invalid_points == 0
    fake.release.set()
    wait_until(lambda: run.statistics().pending_operations == 0, 60, "the backlog to drain")
    run.finish()
    stored = Counter(s for b in fake.accepted for series in b["series"]
                     for s in series["steps"] if series["name"] == "loss")
    assert stored == Counter(range(points))
    assert run.statistics().points_delivered == 2 * points
