"""The MLflow-state port: what the MLflow tracking edge needs from PostgreSQL beyond the write and
read ports (experiments as projects with a lifecycle and tags; runs' start/end times, user and
lifecycle; dataset inputs; the origins of step-less metric histories).

`mlrun.server.storage.postgres.mlflow_state.MlflowStateStore` implements it on the side tables of
sql/postgres/0006_mlflow.sql. The records are plain values; the use-case
(`mlrun.server.usecases.mlflow`) renders them into MLflow's JSON.

Must not import storage, pipelines, edges or anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

LifecycleStage = Literal["active", "deleted"]


@dataclass(frozen=True, slots=True)
class ExperimentRecord:
    """A project seen as an MLflow experiment (`project_id` is the experiment id)."""

    project_id: int
    name: str
    lifecycle_stage: LifecycleStage
    creation_time_ms: int
    last_update_time_ms: int
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RunExtras:
    """What MLflow shows of a run besides our run record. Runs logged by the MLRun SDK have no
    row: they start at `created_at`, end at `finished_at` and are active. `project_id` is the
    run's experiment id."""

    project_id: int
    start_time_ms: int
    end_time_ms: int | None
    user_id: str
    lifecycle_stage: LifecycleStage


@dataclass(frozen=True, slots=True)
class DatasetInput:
    """One dataset a run used: MLflow's dataset record (name, digest, source_type, source,
    schema, profile) and the input's tags, both as MLflow sent them."""

    dataset: dict[str, str]
    tags: list[dict[str, str]]


@dataclass(frozen=True, slots=True)
class Step0Origins:
    """For the step-less mapping: the run's start (client clock) and the first step-0 timestamp
    of each named metric that has one."""

    run_start_ms: int
    first_ms: dict[str, int]


class MlflowState(Protocol):
    # experiments
    async def experiments(self, *, ids: Sequence[int] | None = None,
                          names: Sequence[str] | None = None) -> list[ExperimentRecord]:
        """Experiments by project id or by name (every project when both are None)."""
        ...

    async def touch_experiment(self, project_id: int, *,
                               lifecycle_stage: LifecycleStage | None = None,
                               new_name: str | None = None) -> None:
        """Move the experiment's last update time (and set its stage or rename it);
        404 `project_not_found` for an unknown id, 409 `project_exists` for a taken name."""
        ...

    async def set_experiment_tags(self, project_id: int, tags: Mapping[str, str]) -> None: ...

    async def delete_experiment_tag(self, project_id: int, key: str) -> None: ...

    # runs
    async def record_run(self, run_id: str, *, start_time_ms: int, user_id: str) -> None:
        """The MLflow side of a new run (idempotent)."""
        ...

    async def run_extras(self, run_ids: Sequence[str]) -> dict[str, RunExtras]:
        """The MLflow side of the runs among `run_ids` that exist (defaults for SDK runs)."""
        ...

    async def update_run(self, run_id: str, *, end_time_ms: int | None = None,
                         name: str | None = None,
                         lifecycle_stage: LifecycleStage | None = None) -> None:
        """Set what is given (`name` renames the run); 404 `run_not_found`."""
        ...

    async def delete_tag(self, run_id: str, key: str) -> bool:
        """False when the run has no such tag."""
        ...

    async def log_inputs(self, run_id: str, inputs: Sequence[DatasetInput]) -> None: ...

    async def inputs(self, run_ids: Sequence[str]) -> dict[str, list[DatasetInput]]: ...

    async def step0_origins(self, run_id: str, claim: Mapping[str, int]) -> Step0Origins:
        """Record `claim` (metric name -> the earliest step-0 timestamp of a batch) for the names
        that have no origin yet, and answer the origins now recorded for those names (the first
        claim wins, so a resent batch maps its points exactly as the first attempt did)."""
        ...

    async def origins_of(self, run_ids: Sequence[str]) -> dict[str, Step0Origins]:
        """Every recorded origin of these runs, for mapping stored steps back."""
        ...
