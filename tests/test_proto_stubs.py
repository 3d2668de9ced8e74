"""The committed stubs in mlrun/wire/proto/ are what scripts/gen_proto.py makes from proto/, and the
staleness check really notices a change (proved on a modified copy of the protos)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
GEN_PROTO = REPO_ROOT / "scripts" / "gen_proto.py"
PROTO_DIR = REPO_ROOT / "proto"
STUBS_DIR = REPO_ROOT / "mlrun" / "wire" / "proto"
GEN_TIMEOUT_S = 120.0


def run_gen_proto(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GEN_PROTO), *args],
        capture_output=True,
        text=True,
        timeout=GEN_TIMEOUT_S,
        check=False,
        cwd=REPO_ROOT,
    )


@pytest.mark.timeout(GEN_TIMEOUT_S)
def test_committed_stubs_are_current() -> None:
    result = run_gen_proto("--check")
    assert result.returncode == 0, f"stale stubs:\n{result.stderr}"


@pytest.mark.timeout(GEN_TIMEOUT_S)
def test_check_reports_a_changed_proto(tmp_path: Path) -> None:
    protos = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, protos)
    ingest = protos / "mlrun" / "v1" / "ingest.proto"
    text = ingest.read_text()
    anchor = "message LogBatchResponse {\n"
    assert anchor in text
    ingest.write_text(text.replace(anchor, anchor + "  int64 added_in_this_test = 99;\n"))

    result = run_gen_proto("--check", "--proto-dir", str(protos), "--out-dir", str(STUBS_DIR))

    assert result.returncode == 1
    assert "stale: mlrun/v1/ingest_pb2.py" in result.stderr
    assert "stale: mlrun/v1/ingest_pb2.pyi" in result.stderr
    # Only what the change touches is reported: query.proto's own descriptor did not change.
    assert "query_pb2" not in result.stderr


@pytest.mark.timeout(GEN_TIMEOUT_S)
def test_check_reports_missing_and_unexpected_files(tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    shutil.copytree(STUBS_DIR, stubs, ignore=shutil.ignore_patterns("__pycache__"))
    (stubs / "mlrun" / "v1" / "query_grpc.py").unlink()
    (stubs / "mlrun" / "v1" / "removed_pb2.py").write_text("# left over from a deleted proto\n")

    result = run_gen_proto("--check", "--out-dir", str(stubs))

    assert result.returncode == 1
    assert "missing: mlrun/v1/query_grpc.py" in result.stderr
    assert "not generated from any proto: mlrun/v1/removed_pb2.py" in result.stderr


@pytest.mark.timeout(GEN_TIMEOUT_S)
def test_regenerating_into_an_empty_dir_reproduces_the_committed_tree(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_gen_proto("--out-dir", str(out)).returncode == 0

    def tree(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        }

    assert tree(out) == tree(STUBS_DIR)


def test_generated_modules_import_each_other_inside_the_package() -> None:
    from mlrun.wire.proto.grpc.health.v1 import health_grpc, health_pb2
    from mlrun.wire.proto.mlrun.v1 import ingest_grpc, ingest_pb2, query_grpc, query_pb2

    # query.proto imports ingest.proto: the message types are the very same objects.
    params = query_pb2.Run.DESCRIPTOR.fields_by_name["params"]
    assert params.message_type is ingest_pb2.Param.DESCRIPTOR
    assert query_pb2.Run.__module__ == "mlrun.wire.proto.mlrun.v1.query_pb2"
    assert vars(query_grpc)["mlrun_dot_v1_dot_ingest__pb2"] is ingest_pb2

    assert list(ingest_grpc.IngestServiceServicer().service.methods) == [
        "InitRun", "LogBatch", "LogParams", "LogTags", "Heartbeat", "FinishRun",
        "CreateArtifactUpload", "FinalizeArtifactUpload",
    ]  # fmt: skip
    assert list(query_grpc.QueryServiceServicer().service.methods) == [
        "ListRuns", "GetRun", "GetMetrics", "CompareRuns", "ListArtifacts",
        "GetArtifactDownloadUrl",
    ]  # fmt: skip
    assert health_grpc.HealthServicer().service.name == "grpc.health.v1.Health"
    assert health_pb2.HealthCheckResponse.SERVING == 1

    # proto3 `optional` keeps presence; point arrays are packed.
    batch = ingest_pb2.LogBatchRequest(run_id="r")
    assert not batch.HasField("seq")
    batch.seq = 0
    assert batch.HasField("seq")
    steps = query_pb2.MetricSeries.DESCRIPTOR.fields_by_name["steps"]
    assert steps.is_packed
    series = query_pb2.MetricSeries(steps=range(1000), values=[0.5] * 1000)
    assert len(series.SerializeToString()) < 1000 * 8 + 1000 * 2 + 16
