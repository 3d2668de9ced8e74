"""The operations the SDK delivers to the server, and their encoding on disk.

A run's life on the wire is an ordered sequence of operations: create the run (`InitOp`), ingest
batches (`BatchOp`), finish it (`FinishOp`). Every operation is idempotent on the server —
InitRun on `run_id`, a batch on `(run_id, batch_id)`, finish on the run's final status — which
is what makes retries, spooling and replay exactly-once. So an operation is formed once, with its
identity (`batch_id`, `seq`) fixed, and the same bytes are sent on every attempt.

`pos` is the operation's place in its process's delivery order; it is assigned by the outbox
when the operation is queued and names its spool file, so a replay keeps the order.

Encoding: msgspec JSON of the tagged union, gzip-compressed (level 1: cheap, ~4x smaller for
metric batches). `DeadLetter` wraps an operation the server refused, with the server's answer.

Must not import httpx, grpc or anything from `mlrun.server`.
"""

from __future__ import annotations

import zlib

import msgspec
from msgspec import Struct

from mlrun.wire.schemas import FinishRun, IngestBatch, InitRun


class InitOp(Struct, frozen=True, tag="init", kw_only=True):
    pos: int = -1
    request: InitRun


class BatchOp(Struct, frozen=True, tag="batch", kw_only=True):
    pos: int = -1
    request: IngestBatch
    points: int  # metric + system points in the batch (statistics and progress)


class FinishOp(Struct, frozen=True, tag="finish", kw_only=True):
    pos: int = -1
    run_id: str
    request: FinishRun


Op = InitOp | BatchOp | FinishOp


class DeadLetter(Struct, frozen=True, kw_only=True):
    """An operation the server refused for good, kept for a human instead of thrown away."""

    op: Op
    status: str  # "HTTP 404", "gRPC NOT_FOUND"
    code: str  # the server's machine code, e.g. "not_found", "batch_conflict"
    message: str
    at_ms: int


def op_kind(op: Op) -> str:
    if isinstance(op, BatchOp):
        return "batch"
    return "init" if isinstance(op, InitOp) else "finish"


def run_id_of(op: Op) -> str:
    if isinstance(op, FinishOp):
        return op.run_id
    if isinstance(op, InitOp):
        return op.request.run_id or ""
    return op.request.run_id


_encoder = msgspec.json.Encoder()
_op_decoder = msgspec.json.Decoder(Op)
_dead_decoder = msgspec.json.Decoder(DeadLetter)

# gzip framing (wbits 16+15) so a spool file's payload can be inspected with zcat.
_GZIP_WBITS = 31


def encode_op(op: Op) -> bytes:
    return zlib.compress(_encoder.encode(op), 1, _GZIP_WBITS)


def decode_op(data: bytes) -> Op:
    """Raises msgspec.DecodeError / zlib.error on damaged input (the spool quarantines it)."""
    op: Op = _op_decoder.decode(zlib.decompress(data, _GZIP_WBITS))
    return op


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return zlib.compress(_encoder.encode(letter), 1, _GZIP_WBITS)


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dead_decoder.decode(zlib.decompress(data, _GZIP_WBITS))
