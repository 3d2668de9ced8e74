"""Test double: `mlrun.v1.IngestService` and `mlrun.v1.QueryService` servicers whose every method
ends its call UNIMPLEMENTED with the `mlrun-error-code` trailer.

The gRPC listener tests mount these where they need real service descriptors but no use-cases;
the artifact tests subclass them and override the artifact methods only. The real servicers live
in `mlrun.server.edges.grpc`.
"""

from __future__ import annotations

from mlrun.server.edges.grpc.listener import GrpcAbort
from mlrun.server.errors import GrpcCode
from mlrun.wire.proto.mlrun.v1 import ingest_grpc, ingest_pb2, query_grpc, query_pb2


def _unimplemented(service: str, method: str) -> GrpcAbort:
    return GrpcAbort(
        GrpcCode.UNIMPLEMENTED,
        f"/{service}/{method} is not implemented yet",
        trailing_metadata=[("mlrun-error-code", "unimplemented")],
    )


class IngestServicer(ingest_grpc.IngestServiceServicer):
    """`mlrun.v1.IngestService`; pass `IngestServicer().service` to `serve_grpc`."""

    NAME = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name

    async def InitRun(self, message: ingest_pb2.InitRunRequest) -> ingest_pb2.InitRunResponse:
        raise _unimplemented(self.NAME, "InitRun")

    async def LogBatch(self, message: ingest_pb2.LogBatchRequest) -> ingest_pb2.LogBatchResponse:
        raise _unimplemented(self.NAME, "LogBatch")

    async def LogParams(self, message: ingest_pb2.LogParamsRequest) -> ingest_pb2.LogParamsResponse:
        raise _unimplemented(self.NAME, "LogParams")

    async def LogTags(self, message: ingest_pb2.LogTagsRequest) -> ingest_pb2.LogTagsResponse:
        raise _unimplemented(self.NAME, "LogTags")

    async def Heartbeat(self, message: ingest_pb2.HeartbeatRequest) -> ingest_pb2.HeartbeatResponse:
        raise _unimplemented(self.NAME, "Heartbeat")

    async def FinishRun(self, message: ingest_pb2.FinishRunRequest) -> ingest_pb2.FinishRunResponse:
        raise _unimplemented(self.NAME, "FinishRun")

    async def CreateArtifactUpload(
        self, message: ingest_pb2.CreateArtifactUploadRequest
    ) -> ingest_pb2.CreateArtifactUploadResponse:
        raise _unimplemented(self.NAME, "CreateArtifactUpload")

    async def FinalizeArtifactUpload(
        self, message: ingest_pb2.FinalizeArtifactUploadRequest
    ) -> ingest_pb2.FinalizeArtifactUploadResponse:
        raise _unimplemented(self.NAME, "FinalizeArtifactUpload")


class QueryServicer(query_grpc.QueryServiceServicer):
    """`mlrun.v1.QueryService`; pass `QueryServicer().service` to `serve_grpc`."""

    NAME = query_pb2.DESCRIPTOR.services_by_name["QueryService"].full_name

    async def ListRuns(self, message: query_pb2.ListRunsRequest) -> query_pb2.ListRunsResponse:
        raise _unimplemented(self.NAME, "ListRuns")

    async def GetRun(self, message: query_pb2.GetRunRequest) -> query_pb2.GetRunResponse:
        raise _unimplemented(self.NAME, "GetRun")

    async def GetMetrics(
        self, message: query_pb2.GetMetricsRequest
    ) -> query_pb2.GetMetricsResponse:
        raise _unimplemented(self.NAME, "GetMetrics")

    async def CompareRuns(
        self, message: query_pb2.CompareRunsRequest
    ) -> query_pb2.CompareRunsResponse:
        raise _unimplemented(self.NAME, "CompareRuns")

    async def ListArtifacts(
        self, message: query_pb2.ListArtifactsRequest
    ) -> query_pb2.ListArtifactsResponse:
        raise _unimplemented(self.NAME, "ListArtifacts")

    async def GetArtifactDownloadUrl(
        self, message: query_pb2.GetArtifactDownloadUrlRequest
    ) -> query_pb2.GetArtifactDownloadUrlResponse:
        raise _unimplemented(self.NAME, "GetArtifactDownloadUrl")
