"""Which stage of the ingest path a sampled server stack belongs to: pure, no I/O.

Owns the stage list, the rules that map a Python stack (as `py-spy record --format raw` writes
it: `thread (tid): name;outer frame;...;leaf frame count`, a frame being `function (file:line)`)
onto one stage, and the tally of samples per stage and thread group.

The rule: walk a stack from the leaf towards the root; the first frame that a rule claims
decides. Frames of the async and HTTP/2 plumbing (trio, anyio, hypercorn, h11, h2, purerpc,
sniffio, outcome) are claimed by nobody, so what they cost inside a stage is that stage's cost
(the thread hop of a PostgreSQL call is PostgreSQL's, a cancel scope around the ClickHouse
insert is ClickHouse's); a stack that no rule claims at all (the event loop, the HTTP protocol
before the app is called) is `plumbing`. Separately, `framework_leaf` counts samples whose leaf
frame is plumbing, wherever they were attributed: the event-loop share in the classic sense.

Stages (what a reader of the report needs to decide where to cut):

    parse       request body -> schema Struct: msgspec JSON decode (with its constraint
                checks), gRPC protobuf -> builtins
    validate    the use-case's checks and column gathering: lengths, names, finiteness, NUL
                checks, msgspec.convert of the gRPC builtins
    hash        the payload hash for the idempotency ledger (a canonical re-encode + sha256)
    auth        API key and run-access checks
    usecase     the rest of the write use-case: its orchestration, deadlines, in-flight map
    postgres    the ledger/run transaction and the ledger marks: psycopg, the pool, the
                thread hop, mlrun's PostgreSQL store
    encode      RowBinary encoding, the admission estimate, group-commit bookkeeping
    clickhouse  the server's ClickHouse client: sending the INSERT and reading its answer
                (CPU only; the wall-clock wait is in the flush statistics)
    edge        the rest of mlrun's HTTP/gRPC edge (routing, headers, answers)
    plumbing    no mlrun or backend frame: the event loop, hypercorn/h11/h2/purerpc protocol
    other       anything else (logging, telemetry, the supervisor, ...)

The rules name files by their path below `mlrun/server/` and functions by their qualified
name, so moving a module inside the server means updating a line here (an unclaimed mlrun frame
ends up in `other`, which the report shows: a large `other` says the rules are stale).

Must not import anyio or the server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

STAGES: tuple[str, ...] = (
    "parse", "validate", "hash", "auth", "usecase", "postgres", "encode", "clickhouse", "edge",
    "plumbing", "other",
)

# (stage, path fragment or "", function qualname suffix or ""): both must match when given.
# Checked in order for each frame, so specific rules come before the file-wide ones.
_RULES: tuple[tuple[str, str, str], ...] = (
    # parse
    ("parse", "mlrun/server/edges/payloads.py", "decode_json"),
    ("parse", "mlrun/server/edges/http/", "decode_body"),
    ("parse", "mlrun/wire/schemas.py", "IngestBatchBody.batch"),
    ("parse", "mlrun/server/edges/grpc/ingest_servicer.py", "_points"),
    ("parse", "mlrun/server/edges/grpc/ingest_servicer.py", "_columns"),
    ("parse", "mlrun/server/edges/grpc/ingest_servicer.py", "_column_points"),
    ("parse", "mlrun/server/edges/grpc/ingest_servicer.py", "scalar_from_value"),
    ("parse", "mlrun/server/edges/grpc/ingest_servicer.py", "batch_from_proto"),
    ("parse", "google/protobuf/", ""),
    # validate (payloads.convert and the NUL walk run inside batch_from_proto: checked first)
    ("validate", "mlrun/server/edges/payloads.py", ""),
    ("validate", "mlrun/server/usecases/ingest.py", "gather_columns"),
    ("validate", "mlrun/server/usecases/ingest.py", "_check_name_bytes"),
    ("validate", "mlrun/server/usecases/ingest.py", "_drop_non_finite"),
    ("validate", "mlrun/server/usecases/ingest.py", "_all_finite"),
    ("validate", "mlrun/server/usecases/ingest.py", "only_names"),
    ("validate", "mlrun/server/usecases/ingest.py", "with_versions"),
    ("hash", "mlrun/server/usecases/ingest.py", "payload_hash"),
    # auth
    ("auth", "mlrun/server/usecases/auth.py", ""),
    ("auth", "mlrun/server/usecases/access.py", ""),
    ("auth", "mlrun/server/usecases/keys.py", ""),
    ("auth", "mlrun/server/edges/headers.py", ""),
    ("usecase", "mlrun/server/usecases/", ""),
    # postgres
    ("postgres", "/psycopg/", ""),
    ("postgres", "/psycopg_pool/", ""),
    ("postgres", "/psycopg_binary/", ""),
    ("postgres", "mlrun/server/storage/postgres/", ""),
    ("postgres", "mlrun/server/pipelines/ledger_marker.py", ""),
    # clickhouse (before encode: the flush closure lives in the write-path module)
    ("clickhouse", "mlrun/server/pipelines/clickhouse_write_path.py", "flush"),
    ("clickhouse", "mlrun/server/pipelines/clickhouse_write_path.py", "holds"),
    ("clickhouse", "mlrun/server/storage/clickhouse/", ""),
    ("clickhouse", "/httpx/", ""),
    ("clickhouse", "/httpcore/", ""),
    # encode
    ("encode", "mlrun/server/protocols/clickhouse.py", ""),
    ("encode", "mlrun/server/pipelines/", ""),
    # the rest of our edges
    ("edge", "mlrun/server/edges/", ""),
)
_PLUMBING_PATHS = (
    "/trio/", "/anyio/", "/hypercorn/", "/h11/", "/h2/", "/hpack/", "/purerpc/", "/sniffio/",
    "/outcome/", "/asyncio/", "/selectors.py", "/contextlib.py", "/threading.py",
)
_ENTRY_POINT = "mlrun/__main__.py"
MAIN_GROUP = "main"  # the event-loop thread
WORKER_GROUP = "workers"  # every other thread (PostgreSQL calls run in worker threads)


@dataclass(frozen=True, slots=True)
class Frame:
    function: str
    path: str


def parse_frame(text: str) -> Frame:
    """`Class.method (/path/to/file.py:123)` -> Frame; anything else keeps its text."""
    function, sep, rest = text.rpartition(" (")
    if not sep or not rest.endswith(")"):
        return Frame(text, "")
    path = rest[:-1].rsplit(":", 1)[0]
    return Frame(function, path)


def _rule_matches(frame: Frame, path_part: str, function_suffix: str) -> bool:
    if path_part and path_part not in frame.path:
        return False
    if function_suffix:
        function = frame.function
        return function == function_suffix or function.endswith("." + function_suffix) \
            or function.startswith(function_suffix + ".") or (
                "." + function_suffix + "." in function)
    return True


def is_plumbing(frame: Frame) -> bool:
    return any(part in frame.path for part in _PLUMBING_PATHS)


def stage_of(frames: list[Frame]) -> str:
    """The stage of one stack, `frames` ordered root first (as py-spy writes them)."""
    for frame in reversed(frames):
        for stage, path_part, function_suffix in _RULES:
            if _rule_matches(frame, path_part, function_suffix):
                return stage
    # The event loop's own frames hang below the entry point (mlrun/__main__.py): plumbing.
    if any("/mlrun/" in frame.path and not frame.path.endswith(_ENTRY_POINT)
           for frame in frames):
        return "other"
    return "plumbing" if frames else "other"


@dataclass(slots=True)
class StageTally:
    """Samples per (thread group, stage), plus the plumbing-leaf and unclaimed-frame counts."""

    samples: dict[str, Counter[str]] = field(default_factory=dict)
    framework_leaf: int = 0
    # The leaf frame of samples that fell into `other`: shows which rule is missing.
    other_leaves: Counter[str] = field(default_factory=Counter)

    def total(self, group: str | None = None) -> int:
        groups = [group] if group is not None else list(self.samples)
        return sum(sum(self.samples.get(g, Counter()).values()) for g in groups)


def _group_of(thread: str) -> str:
    """`thread (1234): MainThread` -> main; any other thread -> workers."""
    return MAIN_GROUP if thread.rstrip().endswith(": MainThread") else WORKER_GROUP


def tally_raw(lines: Iterable[str]) -> StageTally:
    """Tally `py-spy record --format raw --threads --full-filenames` output."""
    tally = StageTally()
    for line in lines:
        line = line.rstrip("\n")
        stack, sep, count_text = line.rpartition(" ")
        if not sep or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        if parts and parts[0].startswith("thread ("):
            group, frame_texts = _group_of(parts[0]), parts[1:]
        else:
            group, frame_texts = MAIN_GROUP, parts
        frames = [parse_frame(text) for text in frame_texts if text]
        stage = stage_of(frames)
        tally.samples.setdefault(group, Counter())[stage] += count
        if frames and is_plumbing(frames[-1]):
            tally.framework_leaf += count
        if stage == "other" and frames:
            leaf = frames[-1]
            tally.other_leaves[f"{leaf.function} ({leaf.path.rsplit('/', 2)[-1]})"] += count
    return tally


def split_cpu(tally: StageTally, cpu_by_group: dict[str, float]) -> dict[str, float]:
    """CPU seconds per stage: each thread group's measured CPU shared out by its samples.
    A group with CPU but no sample keeps its CPU under `unsampled <group>`."""
    split: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    for group, cpu_s in cpu_by_group.items():
        counts = tally.samples.get(group, Counter())
        total = sum(counts.values())
        if total == 0:
            if cpu_s > 0:
                split[f"unsampled {group}"] = split.get(f"unsampled {group}", 0.0) + cpu_s
            continue
        for stage, count in counts.items():
            split[stage] = split.get(stage, 0.0) + cpu_s * count / total
    return split
