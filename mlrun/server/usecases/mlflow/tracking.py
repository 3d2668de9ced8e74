"""The MLflow tracking use-cases: MLflow's experiments, runs, logging and history calls on MLRun's
own use-cases and ports (no second storage model).

The mapping (README "Using MLRun from MLflow"):
- an experiment is a project; its id is the project's id as a string, except the project named
  `Default`, which is experiment "0" (MLflow's default experiment, created on first use);
- an MLflow run is a run (ids are 32 hex characters); its status is ours in capitals; its start
  and end time, user and lifecycle stage live in `mlflow_runs`; params and tags are our params
  and tags (system tags such as `mlflow.runName` included; setting `mlflow.runName` renames);
- metrics go through `Ingest.log_batch`, the same use-case, ledger and group-committed write
  path as our own batches. A log-batch gets a batch id derived from its run and its body
  (`mlflow-` + SHA-256), so a resent request — the client retries POSTs — is answered from the
  idempotency ledger and never stored twice. Steps are mapped as `usecases.mlflow.steps` says
  (step-less histories keep every point);
- params are write-once with MLflow's error: another value for a logged param is a 400 (the
  batch's metrics are stored, its conflicting param is not);
- reads come from `Queries` (history: raw pages; bulk-interval: our downsampling) and from the
  run and metric read ports (search evaluates MLflow's grammar here, over at most
  `MAX_SEARCH_CANDIDATES` runs of the named experiments, narrowed first in PostgreSQL by the
  filter's tag and param equalities and its status).

Access: the same scopes as our API (`read` for reads, `write` for the rest), and a
project-scoped key sees only its project's experiment and runs (others are "does not exist").

Must not import the edges or storage: it reaches PostgreSQL and ClickHouse through the ports
and the other use-cases.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast, get_args

import msgspec

from mlrun.server.concurrently import both
from mlrun.server.errors import InvalidInput, NotFound
from mlrun.server.ports.keys import Principal
from mlrun.server.ports.metric_reads import MetricReads, SummaryRow
from mlrun.server.ports.mlflow_state import (
    DatasetInput,
    ExperimentRecord,
    LifecycleStage,
    MlflowState,
    RunExtras,
    Step0Origins,
)
from mlrun.server.ports.run_reads import ParamFilter, RunFilter, RunReads, RunRecord, TagFilter
from mlrun.server.usecases.access import RunAccess
from mlrun.server.usecases.ingest import Ingest
from mlrun.server.usecases.mlflow import search, steps
from mlrun.server.usecases.queries import Queries, SeriesRequest
from mlrun.wire import mlflow_messages as m
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import (
    MAX_PARAM_VALUE_CHARS,
    MAX_TAG_VALUE_CHARS,
    CreateProject,
    FinalStatus,
    IngestBatch,
    InitRun,
    MetricSeries,
    Param,
    Tag,
)

DEFAULT_EXPERIMENT_ID = "0"
DEFAULT_EXPERIMENT_NAME = "Default"
# Runs a search may consider after PostgreSQL's narrowing (their summaries are read at once).
MAX_SEARCH_CANDIDATES = 50_000
# Step-0 origins never change once recorded: remembered per (run, metric), bounded.
ORIGIN_CACHE_ENTRIES = 100_000
MAX_KEY_CHARS = 250
RUN_NAME_TAG = "mlflow.runName"

ViewType = Literal["ACTIVE_ONLY", "DELETED_ONLY", "ALL"]
_STATUS_TO_MLFLOW = {"running": "RUNNING", "finished": "FINISHED", "failed": "FAILED",
                     "killed": "KILLED"}
_STATUS_FROM_MLFLOW = {v: k for k, v in _STATUS_TO_MLFLOW.items()}


def invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code=ErrorCode.INVALID_FIELD, field=field)


def _number(value: m.Number | None, field: str, *, integer: bool) -> float:
    """A double or int64 as MLflow sends it: a JSON number, or a string (also NaN/±Infinity)."""
    if value is None:
        return 0.0
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            raise invalid(field, f"{value!r} is not a number") from None
    else:
        parsed = float(value)
    if integer:
        if not math.isfinite(parsed) or parsed != int(parsed):
            raise invalid(field, f"{value!r} is not an integer")
        if not 0 <= parsed < 2**63:
            raise invalid(field, "must be between 0 and 2^63-1")
    return parsed


def _check_key(key: str, field: str) -> str:
    if not key:
        raise invalid(field, "must not be empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidInput(f"{field}: longer than {MAX_KEY_CHARS} characters",
                           code=ErrorCode.VALUE_TOO_LONG, field=field)
    return key


def _check_value(value: str, field: str, limit: int) -> str:
    # MLflow's own caps in characters (6000 params / 8000 tags); the columns hold them in any
    # UTF-8 (MAX_VALUE_BYTES), so a value within the cap is never refused further in.
    if len(value) > limit:
        raise InvalidInput(f"{field}: longer than {limit} characters",
                           code=ErrorCode.VALUE_TOO_LONG, field=field)
    return value


def _view_type(text: str, field: str) -> ViewType:
    if text not in get_args(ViewType):
        raise invalid(field, "must be ACTIVE_ONLY, DELETED_ONLY or ALL")
    return cast(ViewType, text)


def _visible(stage: str, view: ViewType) -> bool:
    return view == "ALL" or (stage == "active") == (view == "ACTIVE_ONLY")


# A run page's MLflow side rows: extras, dataset inputs and step-0 origins, by run id.
_SideRows = tuple[dict[str, RunExtras], dict[str, list[DatasetInput]], dict[str, Step0Origins]]


def experiment_id_of(record: ExperimentRecord) -> str:
    return DEFAULT_EXPERIMENT_ID if record.name == DEFAULT_EXPERIMENT_NAME else str(
        record.project_id)


def _experiment_message(record: ExperimentRecord) -> m.Experiment:
    experiment_id = experiment_id_of(record)
    return m.Experiment(
        experiment_id=experiment_id, name=record.name,
        artifact_location=f"mlflow-artifacts:/{experiment_id}",
        lifecycle_stage=record.lifecycle_stage, creation_time=record.creation_time_ms,
        last_update_time=record.last_update_time_ms,
        tags=[m.KeyValue(key=k, value=v) for k, v in sorted(record.tags.items())])


def _project_name(name: str, field: str) -> str:
    """An experiment name, valid as a project name (MLRun's rule: 1-100 of A-Z a-z 0-9 _ . -,
    starting with a letter or digit)."""
    try:
        return msgspec.convert({"name": name}, CreateProject).name
    except msgspec.ValidationError:
        raise invalid(field, "an experiment name must be 1-100 characters of A-Z a-z 0-9 _ . -,"
                             " starting with a letter or digit (it names an MLRun project)"
                      ) from None


class MlflowTracking:
    """The MLflow edge's use-cases. Built once per process."""

    def __init__(self, *, ingest: Ingest, queries: Queries, runs: RunReads,
                 metrics: MetricReads, state: MlflowState, run_access: RunAccess) -> None:
        self._ingest = ingest
        self._queries = queries
        self._runs = runs
        self._metrics = metrics
        self._state = state
        self._run_access = run_access
        self._origins: OrderedDict[tuple[str, str], tuple[int, int]] = OrderedDict()

    # --- experiments -------------------------------------------------------------------------

    async def _experiment(self, principal: Principal, experiment_id: str, *,
                          field: str = "experiment_id", create_default: bool = False
                          ) -> ExperimentRecord:
        if experiment_id == DEFAULT_EXPERIMENT_ID:
            found = await self._state.experiments(names=[DEFAULT_EXPERIMENT_NAME])
            if not found and create_default:
                await self._ingest.create_project(principal,
                                                  CreateProject(name=DEFAULT_EXPERIMENT_NAME))
                found = await self._state.experiments(names=[DEFAULT_EXPERIMENT_NAME])
        elif experiment_id.isdigit() and len(experiment_id) < 19:
            found = await self._state.experiments(ids=[int(experiment_id)])
        else:
            found = []
        if not found or (principal.project is not None and found[0].name != principal.project):
            raise NotFound(f"no experiment with id {experiment_id!r}",
                           code=ErrorCode.PROJECT_NOT_FOUND, field=field)
        return found[0]

    async def create_experiment(self, principal: Principal,
                                request: m.CreateExperiment) -> m.CreateExperimentResponse:
        name = _project_name(request.name, "name")
        tags = {_check_key(t.key, f"tags[{i}].key"): t.value for i, t in enumerate(request.tags)}
        await self._ingest.create_project(principal, CreateProject(name=name))
        record = (await self._state.experiments(names=[name]))[0]
        await self._state.touch_experiment(record.project_id)
        if tags:
            await self._state.set_experiment_tags(record.project_id, tags)
        return m.CreateExperimentResponse(experiment_id=experiment_id_of(record))

    async def get_experiment(self, principal: Principal, experiment_id: str) -> m.Experiment:
        principal.require("read")
        return _experiment_message(await self._experiment(principal, experiment_id))

    async def get_experiment_by_name(self, principal: Principal, name: str) -> m.Experiment:
        principal.require("read")
        found = await self._state.experiments(names=[name])
        if not found or (principal.project is not None and name != principal.project):
            raise NotFound(f"no experiment named {name!r}", code=ErrorCode.PROJECT_NOT_FOUND,
                           field="experiment_name")
        return _experiment_message(found[0])

    async def search_experiments(self, principal: Principal, request: m.SearchExperiments
                                 ) -> m.SearchExperimentsResponse:
        principal.require("read")
        view = _view_type(request.view_type, "view_type")
        if not 1 <= request.max_results <= m.MAX_SEARCH_RESULTS:
            raise invalid("max_results", f"must be 1..{m.MAX_SEARCH_RESULTS}")
        comparisons = search.parse_filter(request.filter)
        order = search.parse_order_by(request.order_by)
        records = [r for r in await self._state.experiments()
                   if _visible(r.lifecycle_stage, view)
                   and (principal.project is None or r.name == principal.project)]

        def attributes(r: ExperimentRecord) -> dict[str, str | float | None]:
            return {"name": r.name, "experiment_id": experiment_id_of(r),
                    "creation_time": float(r.creation_time_ms),
                    "last_update_time": float(r.last_update_time_ms),
                    "lifecycle_stage": r.lifecycle_stage}

        matching = [r for r in records if search.matches(comparisons, search.run_lookup(
            metrics={}, params={}, tags=r.tags, attributes=attributes(r)))]

        def value_of(r: ExperimentRecord, clause: search.OrderClause) -> str | float | None:
            return r.tags.get(clause.key) if clause.entity == "tags" else attributes(r).get(
                clause.key)

        ordered = search.ordered(matching, order, value_of,
                                 lambda r: (-float(r.creation_time_ms), f"{r.project_id:020d}"))
        query = repr((request.filter, request.order_by, view))
        offset = search.decode_page_token(request.page_token, query)
        page = ordered[offset:offset + request.max_results]
        more = offset + request.max_results < len(ordered)
        return m.SearchExperimentsResponse(
            experiments=[_experiment_message(r) for r in page],
            next_page_token=search.encode_page_token(offset + len(page), query) if more else None)

    async def update_experiment(self, principal: Principal, experiment_id: str, *,
                                new_name: str | None = None,
                                lifecycle_stage: LifecycleStage | None = None) -> None:
        principal.require("write")
        record = await self._experiment(principal, experiment_id)
        if new_name is not None:
            new_name = _project_name(new_name, "new_name")
            principal.require_project(new_name)
        await self._state.touch_experiment(record.project_id, new_name=new_name,
                                           lifecycle_stage=lifecycle_stage)

    async def set_experiment_tag(self, principal: Principal, request: m.SetExperimentTag
                                 ) -> None:
        principal.require("write")
        record = await self._experiment(principal, request.experiment_id)
        await self._state.set_experiment_tags(record.project_id,
                                              {_check_key(request.key, "key"): request.value})

    async def delete_experiment_tag(self, principal: Principal,
                                    request: m.DeleteExperimentTag) -> None:
        principal.require("write")
        record = await self._experiment(principal, request.experiment_id)
        await self._state.delete_experiment_tag(record.project_id, request.key)

    # --- runs --------------------------------------------------------------------------------

    async def create_run(self, principal: Principal, request: m.CreateRun) -> m.Run:
        principal.require("write")
        record = await self._experiment(principal, request.experiment_id or "0",
                                        create_default=True)
        if record.lifecycle_stage != "active":
            raise invalid("experiment_id", f"experiment {request.experiment_id} is deleted")
        tags = {_check_key(t.key, f"tags[{i}].key"):
                _check_value(t.value, f"tags[{i}].value", MAX_TAG_VALUE_CHARS)
                for i, t in enumerate(request.tags)}
        run_id = uuid.uuid4().hex
        name = request.run_name or tags.get(RUN_NAME_TAG) or run_id
        tags[RUN_NAME_TAG] = name
        try:
            init = msgspec.convert({"project": record.name, "name": name, "run_id": run_id,
                                    "tags": tags}, InitRun)
        except msgspec.ValidationError as exc:
            raise invalid("tags", str(exc)) from None
        start_ms = (int(_number(request.start_time, "start_time", integer=True))
                    if request.start_time is not None else time.time_ns() // 1_000_000)
        await self._ingest.init_run(principal, init)
        await self._state.record_run(run_id, start_time_ms=start_ms, user_id=request.user_id)
        return await self.get_run(principal, run_id)

    async def _run_record(self, principal: Principal, run_id: str) -> RunRecord:
        record = await self._runs.detail(run_id)
        if record is None:
            raise NotFound(f"run {run_id!r} does not exist", code=ErrorCode.RUN_NOT_FOUND,
                           field="run_id")
        principal.require_run_visible(run_id, record.project)
        return record

    async def get_run(self, principal: Principal, run_id: str) -> m.Run:
        principal.require("read")
        ids = [run_id]
        # Everything that needs only the run id at once: one round trip of latency for the
        # run, its metric summaries and its MLflow side rows; then only its experiment.
        (record, summaries), side = await both(
            lambda: both(lambda: self._run_record(principal, run_id),
                         lambda: self._metrics.summaries(ids, with_counts=False)),
            lambda: self._side_rows(ids))
        rendered = await self._assemble([record], summaries, side)
        if not rendered:
            raise NotFound(f"run {run_id!r} does not exist", code=ErrorCode.RUN_NOT_FOUND,
                           field="run_id")
        return rendered[0]

    async def _side_rows(self, ids: Sequence[str]) -> _SideRows:
        """The MLflow side rows of runs `ids` (extras, dataset inputs, step-0 origins)."""
        (extras, inputs), origins = await both(
            lambda: both(lambda: self._state.run_extras(ids), lambda: self._state.inputs(ids)),
            lambda: self._state.origins_of(ids))
        return extras, inputs, origins

    async def _render_runs(self, records: Sequence[RunRecord],
                           summaries: Sequence[SummaryRow]) -> list[m.Run]:
        side = await self._side_rows([r.run_id for r in records])
        return await self._assemble(records, summaries, side)

    async def _assemble(self, records: Sequence[RunRecord], summaries: Sequence[SummaryRow],
                        side: _SideRows) -> list[m.Run]:
        extras, inputs, origins = side
        latest: dict[str, list[m.MetricOut]] = {}
        for s in summaries:
            step = 0 if s.name in (origins.get(s.run_id) or _NO_ORIGINS).first_ms \
                else s.last_step
            latest.setdefault(s.run_id, []).append(
                m.MetricOut(key=s.name, value=s.last_value, timestamp=0, step=step))
        experiment_ids = {e.project_id: experiment_id_of(e) for e in
                          await self._state.experiments(
                              ids=sorted({x.project_id for x in extras.values()}))}
        runs = []
        for record in records:
            extra = extras.get(record.run_id)
            if extra is None:  # deleted since it was read
                continue
            runs.append(m.Run(
                info=self._run_info(record, extra, experiment_ids.get(extra.project_id,
                                                                    str(extra.project_id))),
                data=m.RunData(
                    metrics=latest.get(record.run_id, []),
                    params=[m.KeyValue(key=k, value=v) for k, v in sorted(record.params.items())],
                    tags=[m.KeyValue(key=k, value=v) for k, v in sorted(record.tags.items())]),
                inputs=m.RunInputs(dataset_inputs=[
                    m.DatasetInputMessage(tags=[m.KeyValue(key=t.get("key", ""),
                                                           value=t.get("value", ""))
                                                for t in one.tags], dataset=one.dataset)
                    for one in inputs.get(record.run_id, [])])))
        return runs

    @staticmethod
    def _run_info(record: RunRecord, extra: RunExtras, experiment_id: str) -> m.RunInfo:
        return m.RunInfo(
            run_id=record.run_id, run_uuid=record.run_id, run_name=record.name,
            experiment_id=experiment_id, user_id=extra.user_id,
            status=_STATUS_TO_MLFLOW[record.status], start_time=extra.start_time_ms,
            end_time=extra.end_time_ms if record.status != "running" else None,
            artifact_uri=f"mlflow-artifacts:/{experiment_id}/{record.run_id}/artifacts",
            lifecycle_stage=extra.lifecycle_stage)

    async def _writable_run(self, principal: Principal, run_id: str) -> None:
        principal.require("write")
        await self._run_access.require(principal, run_id)

    async def update_run(self, principal: Principal, request: m.UpdateRun) -> m.RunInfo:
        run_id = request.run_id or request.run_uuid or ""
        await self._writable_run(principal, run_id)
        if request.status is not None:
            status = _STATUS_FROM_MLFLOW.get(request.status)
            if status is None and request.status != "SCHEDULED":
                raise invalid("status", "must be RUNNING, FINISHED, FAILED or KILLED")
            if status is not None and status != "running":
                await self._ingest.finish_run(principal, run_id, cast(FinalStatus, status))
        end_ms = (int(_number(request.end_time, "end_time", integer=True))
                  if request.end_time is not None else None)
        if end_ms is not None or request.run_name:
            await self._state.update_run(run_id, end_time_ms=end_ms,
                                         name=request.run_name or None)
        return (await self.get_run(principal, run_id)).info

    async def set_lifecycle(self, principal: Principal, run_id: str,
                            stage: LifecycleStage) -> None:
        await self._writable_run(principal, run_id)
        await self._state.update_run(run_id, lifecycle_stage=stage)

    async def delete_tag(self, principal: Principal, run_id: str, key: str) -> None:
        await self._writable_run(principal, run_id)
        if not await self._state.delete_tag(run_id, key):
            raise NotFound(f"run {run_id!r} has no tag {key!r}", code=ErrorCode.NOT_FOUND,
                           field="key")

    async def log_inputs(self, principal: Principal, request: m.LogInputs) -> None:
        await self._writable_run(principal, request.run_id)
        await self._state.log_inputs(request.run_id, [
            DatasetInput(dataset=one.dataset,
                         tags=[{"key": t.key, "value": t.value} for t in one.tags])
            for one in request.datasets])

    # --- search ------------------------------------------------------------------------------

    async def search_runs(self, principal: Principal, request: m.SearchRuns
                          ) -> m.SearchRunsResponse:
        principal.require("read")
        view = _view_type(request.run_view_type, "run_view_type")
        if not 1 <= request.max_results <= m.MAX_SEARCH_RESULTS:
            raise invalid("max_results", f"must be 1..{m.MAX_SEARCH_RESULTS}")
        comparisons = search.parse_filter(request.filter)
        order = search.parse_order_by(request.order_by)
        query = repr((sorted(request.experiment_ids), request.filter, request.order_by, view))
        offset = search.decode_page_token(request.page_token, query)
        experiments = [await self._experiment(principal, e, field="experiment_ids")
                       for e in dict.fromkeys(request.experiment_ids)]
        narrowed = _pushdown(comparisons)
        ids: list[str] = []
        for experiment in experiments:
            ids += await self._runs.matching_ids(
                RunFilter(project=experiment.name, **narrowed),
                max_runs=MAX_SEARCH_CANDIDATES - len(ids))
            if len(ids) > MAX_SEARCH_CANDIDATES:
                raise InvalidInput(
                    f"a search considers at most {MAX_SEARCH_CANDIDATES} runs; narrow the"
                    " filter with tag or param equalities", code=ErrorCode.TOO_MANY_RUNS,
                    field="filter")
        if not ids:
            return m.SearchRunsResponse()
        (records, summaries), extras = await both(
            lambda: both(lambda: self._runs.by_ids(ids),
                         lambda: self._metrics.summaries(ids, with_counts=False)),
            lambda: self._state.run_extras(ids))
        metrics: dict[str, dict[str, float]] = {}
        for s in summaries:
            metrics.setdefault(s.run_id, {})[s.name] = s.last_value

        def attributes(r: RunRecord) -> dict[str, str | float | None]:
            extra = extras[r.run_id]
            return {"run_id": r.run_id, "run_name": r.name,
                    "status": _STATUS_TO_MLFLOW[r.status], "user_id": extra.user_id,
                    "start_time": float(extra.start_time_ms),
                    "end_time": None if extra.end_time_ms is None else float(extra.end_time_ms),
                    "lifecycle_stage": extra.lifecycle_stage}

        def lookup(r: RunRecord) -> search.Lookup:
            return search.run_lookup(metrics=metrics.get(r.run_id, {}), params=r.params,
                                     tags=r.tags, attributes=attributes(r))

        candidates = [r for r in records.values()
                      if r.run_id in extras and _visible(extras[r.run_id].lifecycle_stage, view)]
        matching = [r for r in candidates if search.matches(comparisons, lookup(r))]

        def value_of(r: RunRecord, clause: search.OrderClause) -> str | float | None:
            return lookup(r)(clause.entity, clause.key)

        ordered = search.ordered(matching, order, value_of,
                                 lambda r: (-float(extras[r.run_id].start_time_ms), r.run_id))
        page = ordered[offset:offset + request.max_results]
        page_ids = {r.run_id for r in page}
        runs = await self._render_runs(page, [s for s in summaries if s.run_id in page_ids])
        more = offset + request.max_results < len(ordered)
        return m.SearchRunsResponse(
            runs=runs,
            next_page_token=search.encode_page_token(offset + len(page), query) if more else None)

    # --- logging -----------------------------------------------------------------------------

    async def log_batch(self, principal: Principal, request: m.LogBatch, *,
                        body_digest: bytes) -> None:
        """A log-batch (and log-metric, log-parameter, set-tag): MLflow's limits, the step
        mapping, then `Ingest.log_batch` under a batch id derived from the request."""
        if len(request.metrics) > m.MAX_METRICS_PER_BATCH:
            raise invalid("metrics", f"at most {m.MAX_METRICS_PER_BATCH} metrics per batch")
        if len(request.params) > m.MAX_PARAMS_PER_BATCH:
            raise invalid("params", f"at most {m.MAX_PARAMS_PER_BATCH} params per batch")
        if len(request.tags) > m.MAX_TAGS_PER_BATCH:
            raise invalid("tags", f"at most {m.MAX_TAGS_PER_BATCH} tags per batch")
        if len(request.metrics) + len(request.params) + len(request.tags) > \
                m.MAX_ENTITIES_PER_BATCH:
            raise invalid("metrics", f"at most {m.MAX_ENTITIES_PER_BATCH} entities per batch")
        run_id = request.run_id
        await self._writable_run(principal, run_id)
        keys, values, timestamps, raw_steps = _metric_columns(request.metrics)
        claim = steps.step0_claim(keys, raw_steps, timestamps) if 0 in raw_steps else {}
        origins = await self._step0_origins(run_id, claim) if claim else None
        stored = steps.stored_steps(keys, raw_steps, timestamps, origins)
        params = [Param(name=_check_key(p.key, f"params[{i}].key"),
                        value=_check_value(p.value, f"params[{i}].value", MAX_PARAM_VALUE_CHARS))
                  for i, p in enumerate(request.params)]
        tags = [Tag(key=_check_key(t.key, f"tags[{i}].key"),
                    value=_check_value(t.value, f"tags[{i}].value", MAX_TAG_VALUE_CHARS))
                for i, t in enumerate(request.tags)]
        batch = IngestBatch(
            run_id=run_id, batch_id="mlflow-" + body_digest.hex()[:40],
            series=_series(keys, values, stored, timestamps), params=params, tags=tags)
        await self._log(principal, batch)
        renamed = [t.value for t in tags if t.key == RUN_NAME_TAG]
        if renamed:
            await self._state.update_run(run_id, name=renamed[-1])

    async def _log(self, principal: Principal, batch: IngestBatch) -> None:
        result = await self._ingest.log_batch(principal, batch, tags_after_finish=True)
        for warning in result.warnings:
            if warning.code == ErrorCode.PARAM_CONFLICT:
                raise InvalidInput(
                    f"changing a param's value is not allowed ({warning.message}); params are"
                    " write-once", code=ErrorCode.INVALID_FIELD, field=warning.field)

    async def _step0_origins(self, run_id: str, claim: Mapping[str, int]) -> Step0Origins:
        cached = {name: self._origins.get((run_id, name)) for name in claim}
        if all(v is not None for v in cached.values()):
            known = {name: v for name, v in cached.items() if v is not None}
            start = next(iter(known.values()))[1]
            return Step0Origins(run_start_ms=start,
                                first_ms={name: v[0] for name, v in known.items()})
        origins = await self._state.step0_origins(run_id, claim)
        for name, first in origins.first_ms.items():
            self._origins[(run_id, name)] = (first, origins.run_start_ms)
        while len(self._origins) > ORIGIN_CACHE_ENTRIES:
            self._origins.popitem(last=False)
        return origins

    # --- history -----------------------------------------------------------------------------

    async def metric_history(self, principal: Principal, request: m.GetHistory
                             ) -> m.GetHistoryResponse:
        run_id = request.run_id or request.run_uuid or ""
        if not 1 <= request.max_results <= m.MAX_HISTORY_PAGE:
            raise invalid("max_results", f"must be 1..{m.MAX_HISTORY_PAGE}")
        result, origins = await both(
            lambda: self._queries.series(principal, run_id, SeriesRequest(
                system=False, names=(_check_key(request.metric_key, "metric_key"),),
                max_points=max(request.max_results, 2), start=None, end=None, method="raw",
                cursor=request.page_token or None)),
            lambda: self._state.origins_of([run_id]))
        origin = origins.get(run_id)
        series = result.series[0] if result.series else None
        if series is None:
            return m.GetHistoryResponse()
        key = series.name
        return m.GetHistoryResponse(
            metrics=[m.MetricOut(key=key, value=p.value, timestamp=p.timestamp,
                                 step=steps.mlflow_step(key, p.step, p.timestamp, origin))
                     for p in series.as_points()],
            next_page_token=series.next_cursor)

    async def metric_history_bulk_interval(self, principal: Principal,
                                           request: m.GetHistoryBulkInterval
                                           ) -> m.BulkIntervalResponse:
        run_ids = list(dict.fromkeys(request.run_ids))
        if not 1 <= len(run_ids) <= m.MAX_BULK_INTERVAL_RUNS:
            raise invalid("run_ids", f"1..{m.MAX_BULK_INTERVAL_RUNS} runs")
        if not 2 <= request.max_results <= m.MAX_BULK_INTERVAL_POINTS:
            raise invalid("max_results", f"must be 2..{m.MAX_BULK_INTERVAL_POINTS}")
        key = _check_key(request.metric_key, "metric_key")
        origins = await self._state.origins_of(run_ids)
        points: list[m.MetricWithRun] = []
        for run_id in run_ids:
            result = await self._queries.series(principal, run_id, SeriesRequest(
                system=False, names=(key,), max_points=request.max_results,
                start=request.start_step, end=request.end_step, method="lttb", cursor=None))
            for series in result.series:
                points += [m.MetricWithRun(
                    key=key, value=p.value, timestamp=p.timestamp, run_id=run_id,
                    step=steps.mlflow_step(key, p.step, p.timestamp, origins.get(run_id)))
                    for p in series.as_points()]
        return m.BulkIntervalResponse(metrics=points)


_NO_ORIGINS = Step0Origins(run_start_ms=0, first_ms={})


def _metric_columns(metrics: Sequence[m.MetricIn]
                    ) -> tuple[list[str], list[float], list[int], list[int]]:
    """Keys, values, timestamps and steps as columns, checked. The common batch (numbers as
    JSON numbers) takes list comprehensions and C-level checks only; a batch with a number sent
    as a string (NaN, "Infinity", GET-style ints) or a bad value takes the per-point path,
    which names the offending field."""
    keys = [p.key for p in metrics]
    for key in set(keys):
        if not key or len(key) > MAX_KEY_CHARS:
            index = keys.index(key)
            _check_key(key, f"metrics[{index}].key")
    raw_values = [p.value for p in metrics]
    try:
        values = [float(v) for v in raw_values]
    except ValueError:
        values = [_number(v, f"metrics[{i}].value", integer=False)
                  for i, v in enumerate(raw_values)]
    return keys, values, _integers([p.timestamp for p in metrics], "timestamp"), \
        _integers([p.step for p in metrics], "step")


def _integers(raw: list[m.Number], name: str) -> list[int]:
    if all(type(v) is int for v in raw):
        ints = cast(list[int], raw)
        if not ints or (min(ints) >= 0 and max(ints) < 2**63):
            return ints
    return [int(_number(v, f"metrics[{i}].{name}", integer=True)) for i, v in enumerate(raw)]


def _series(keys: list[str], values: list[float], stored_steps: list[int],
            timestamps: list[int]) -> list[MetricSeries]:
    """The points as one columnar series per key (the cheapest form for `Ingest`). When each
    key's points are contiguous (the usual batch: a dict per step, or one key after another)
    the columns are sliced; otherwise gathered by index."""
    count = len(keys)
    starts = [0, *(i for i in range(1, count) if keys[i] != keys[i - 1])]
    if len(starts) == len(set(keys)):
        bounds = [*starts, count]
        return [MetricSeries(name=keys[lo], steps=stored_steps[lo:hi], values=values[lo:hi],
                             timestamps=timestamps[lo:hi])
                for lo, hi in itertools.pairwise(bounds) if hi > lo]
    by_key: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        by_key.setdefault(key, []).append(index)
    return [MetricSeries(name=key, steps=[stored_steps[i] for i in indexes],
                         values=[values[i] for i in indexes],
                         timestamps=[timestamps[i] for i in indexes])
            for key, indexes in by_key.items()]


def _pushdown(comparisons: Sequence[search.Comparison]) -> dict[str, Any]:
    """The part of a filter PostgreSQL can apply while listing candidates: tag and param
    equalities and a status equality (the whole filter is still evaluated afterwards)."""
    tags = tuple(TagFilter(c.key, c.value) for c in comparisons
                 if c.entity == "tags" and c.op == "=" and isinstance(c.value, str))
    params = tuple(ParamFilter(c.key, "=", text=c.value) for c in comparisons
                   if c.entity == "params" and c.op == "=" and isinstance(c.value, str))
    statuses = tuple(_STATUS_FROM_MLFLOW.get(str(c.value), "unknown") for c in comparisons
                     if c.entity == "attributes" and c.key == "status" and c.op == "=")
    narrowed: dict[str, Any] = {"tags": tags[:16], "params": params[:16]}
    if statuses:
        narrowed["statuses"] = statuses[:1]
    return narrowed
