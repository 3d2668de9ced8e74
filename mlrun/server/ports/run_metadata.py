"""The metadata port of the write use-cases: projects, run lifecycle and the batch ledger.

Implemented by `mlrun.server.storage.postgres.metadata.MetadataStore` (one transaction per call,
each bounded by its own deadline). `prepare_batch` is the ledger claim plus everything a batch
changes in PostgreSQL (run state check, cardinality, params, tags); see that module for the
protocol and its lock order.

Must not import storage, pipelines, edges or anything that does I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import msgspec

from mlrun.server.ports.write_path import BatchLedger
from mlrun.wire.schemas import (
    FinalStatus,
    IngestWarning,
    InitRun,
    Param,
    Project,
    RunCreated,
    RunState,
    Tag,
)

BatchOutcome = Literal["new", "retry", "duplicate"]


class CardinalityLimits(msgspec.Struct, frozen=True):
    """The guardrails (MLRUN_MAX_TAG_KEYS_PER_RUN, MLRUN_MAX_METRIC_NAMES_PER_RUN,
    MLRUN_MAX_TAGS_PER_PROJECT): names past a limit are dropped with a warning, never refused."""

    max_tag_keys_per_run: int = 100
    max_metric_names_per_run: int = 1000
    max_tags_per_project: int = 10000


@dataclass(frozen=True, slots=True)
class BatchPreparation:
    """What `prepare_batch` decided. "duplicate": write nothing, answer duplicate. "new" or
    "retry": write the points of `admitted_metric_names` only, with versions counted from
    `first_version` (for a retry, the ones its first attempt was given)."""

    outcome: BatchOutcome
    admitted_metric_names: frozenset[str]
    warnings: list[IngestWarning]
    first_version: int


class RunMetadata(BatchLedger, Protocol):
    async def create_project(self, name: str, description: str = "") -> Project: ...

    async def list_projects(self) -> list[Project]: ...

    async def init_run(self, request: InitRun, *, limits: CardinalityLimits
                       ) -> tuple[RunCreated, list[IngestWarning]]: ...

    async def finish_run(self, run_id: str, status: FinalStatus) -> RunState: ...

    async def heartbeat(self, run_id: str) -> RunState: ...

    async def run_project(self, run_id: str) -> str:
        """The name of the run's project; NotFound `run_not_found`."""
        ...

    async def prepare_batch(
        self,
        *,
        run_id: str,
        batch_id: str | None,
        payload_hash: bytes,
        seq: int | None,
        points: int,
        first_version: int,
        metric_names: Collection[str],
        params: Sequence[Param],
        tags: Sequence[Tag],
        limits: CardinalityLimits,
        tags_after_finish: bool = False,
    ) -> BatchPreparation: ...
