"""The step mapping between MLflow metric points and MLRun's series (pure, no I/O).

MLflow keeps every point of a (run, key), deduplicated on (timestamp, step, value); MLRun keeps
one point per (run, metric, step), the last written. `mlflow.log_metric(k, v)` without a step
sends step 0 every time, each point with its own timestamp, so stored as is a whole history
would collapse into its last point. The rule (README "Using MLRun from MLflow"):

- a point at MLflow step s > 0 is stored at step s;
- the first step-0 point of a (run, metric) — the one whose timestamp is the series' *origin*,
  recorded in PostgreSQL by the first batch that carried step-0 points for it — stays at step 0
  (so `step=epoch` histories starting at 0, as Keras and XGBoost log them, are unchanged);
- every other step-0 point is stored at the synthetic step `max(timestamp - run start, 1)`:
  milliseconds since the run started (MLflow's `start_time`, the client's clock, which its
  metric timestamps share). A step-less history therefore plots as a curve over time in our
  own reads, and a resent batch maps to the very same steps (no duplicates: the origin never
  changes once recorded);
- reading back, a point of a series with an origin is MLflow step 0 when its stored step is 0
  or equals `max(timestamp - run start, 1)`; anything else keeps its step.

What is lost against MLflow: two points at one step (or one timestamp of a step-less series)
keep only the last value; a series mixing step-less points with real steps can collide where a
synthetic step equals a real one.

Must not import anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

from mlrun.server.ports.mlflow_state import Step0Origins


def step0_claim(keys: Sequence[str], steps: Sequence[int],
                timestamps_ms: Sequence[int]) -> dict[str, int]:
    """Per metric with step-0 points: the earliest step-0 timestamp of this batch."""
    claim: dict[str, int] = {}
    for key, step, ts in zip(keys, steps, timestamps_ms, strict=True):
        if step == 0:
            known = claim.get(key)
            if known is None or ts < known:
                claim[key] = ts
    return claim


def synthetic_step(timestamp_ms: int, run_start_ms: int) -> int:
    return max(timestamp_ms - run_start_ms, 1)


def stored_steps(keys: Sequence[str], steps: Sequence[int], timestamps_ms: Sequence[int],
                 origins: Step0Origins | None) -> list[int]:
    """The steps the points are stored at (see the module docstring)."""
    if origins is None:
        return steps if isinstance(steps, list) else list(steps)
    first = origins.first_ms
    start = origins.run_start_ms
    return [
        step if step != 0 or first.get(key) == ts else synthetic_step(ts, start)
        for key, step, ts in zip(keys, steps, timestamps_ms, strict=True)
    ]


def mlflow_step(key: str, step: int, timestamp_ms: int, origins: Step0Origins | None) -> int:
    """The MLflow step of a stored point."""
    if origins is None or key not in origins.first_ms:
        return step
    if step == 0 or step == synthetic_step(timestamp_ms, origins.run_start_ms):
        return 0
    return step
