"""The queued bench's verdicts (`bench.queued`): pure functions over a report, no backends.

What is checked is that the report never presents one load as the other: the ack-p99 target is
judged on the nominal (paced, below capacity) lane, the saturated (closed-loop) lane is shown
as a reference with its Little's-law floor and no verdict, every lane says which load it ran,
and the box's CPU pressure is read from Linux PSI where there is one.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from bench.queued import (
    Burst,
    CpuShare,
    Lane,
    QueuedReport,
    Visible,
    _CpuPressure,
    _targets,
    render,
)


def lane(name: str, *, paced: float | None, p99_ms: float, rate: int) -> Lane:
    return Lane(
        name=name, mode="queued" if name.startswith("queued") else "direct",
        paced_points_per_s=paced,
        load=(f"nominal (paced at {paced:.0f} points/s)" if paced
              else "saturated (closed loop)"),
        servers=1, processors=1, writers=32, writers_s=8.0, acked_points=rate * 8,
        ack_points_per_s=rate, ack_p50_ms=p99_ms / 4, ack_p99_ms=p99_ms, requests=rate * 8 // 1000,
        throttled=0, errors={}, drain_s=0.5, sustained_points_per_s=rate,
        server_cpu_us_per_point=2.5, processor_cpu_us_per_point=0.9,
        cpu=[CpuShare("server-1", 1.0, 0.5)], machine_busy_share=0.9, box_cpu_pressure=0.4,
        stored_points=rate * 8, exactly_once=True)


def test_the_ack_target_is_judged_at_nominal_load_and_the_saturated_lane_is_a_reference(
) -> None:
    saturated = lane("queued-k32", paced=None, p99_ms=231.0, rate=300_000)
    nominal = lane("queued-k32-nominal", paced=110_000.0, p99_ms=31.0, rate=110_000)
    direct = lane("direct-k32", paced=None, p99_ms=180.0, rate=220_000)
    visible = Visible(samples=40, p50_ms=250.0, p95_ms=450.0, max_ms=470.0, not_seen=0,
                      background_points_per_s=110_000, box_cpu_pressure=0.3)
    burst = Burst(mode="queued", servers=1, target_points_per_s=660_000, seconds=20,
                  offered_points=1, acked_points=1, requests=10, throttled=0, share_429=0.0,
                  ack_p99_ms=900.0, max_queue_entries=5000, drain_s=3.0, exactly_once=True)
    targets = _targets(direct, saturated, nominal, visible, [burst])
    ack, reference = targets[0], targets[1]
    assert "nominal (paced at 110000 points/s)" in ack.what and ack.met is True
    assert "31.0 ms" in ack.value and "box CPU pressure 0.40" in ack.value
    # 32 writers x 1000 points / 300,000 points/s = 107 ms, whatever the code does.
    assert reference.met is None and "saturated" in reference.what
    assert ">= 107 ms" in reference.what and "231.0 ms" in reference.value
    assert [t.met for t in targets[2:]] == [True, True, True]

    report = QueuedReport(started_at="s", box="b", settings={},
                          lanes=[saturated, nominal], targets=targets)
    text = render(report)
    rows = {line.split()[0]: line for line in text.splitlines()
            if line.startswith("queued-k32")}
    assert " saturated " in rows["queued-k32"] and " nominal 110k/s " in rows["queued-k32-nominal"]
    assert "target n/a    (reference, not a target's load)" in text
    assert "target MET    queued ack p99 < 50 ms at 32 writers, nominal" in text


def test_cpu_pressure_is_the_stalled_share_of_the_span_or_none_without_psi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    psi = tmp_path / "cpu"
    monkeypatch.setattr(_CpuPressure, "_PATH", psi)
    psi.write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=5000000\n"
                   "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    unchanged = _CpuPressure()
    time.sleep(0.05)  # a span to divide by
    assert unchanged.finish() == 0.0
    pressure = _CpuPressure()
    time.sleep(0.05)
    psi.write_text(psi.read_text().replace("total=5000000", "total=9000000", 1))
    assert pressure.finish() == 1.0  # 4 s stalled in a 0.05 s span: every moment, capped
    psi.unlink()
    assert _CpuPressure().finish() is None
