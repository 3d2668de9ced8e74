"""The one error tree of the server.

Every error a client can see is a subclass of `MlrunError`. Each class declares its HTTP status,
its gRPC status code, a stable machine-readable `code`, and whether a retry can help. The HTTP
and gRPC edges render these and nothing else: foreign exceptions (psycopg, httpx, chdb, OS errors)
are translated where they are caught, with the cause chained (`raise X(...) from exc`), and their
text never reaches a client.

    MlrunError                      500  INTERNAL            internal
    ├── InvalidInput                400  INVALID_ARGUMENT    invalid_argument (field names it)
    │   ├── PayloadTooLarge         413  INVALID_ARGUMENT    payload_too_large
    │   └── HeadersTooLarge         431  INVALID_ARGUMENT    headers_too_large
    ├── Unauthenticated             401  UNAUTHENTICATED     unauthenticated
    ├── PermissionDenied            403  PERMISSION_DENIED   permission_denied
    ├── NotFound                    404  NOT_FOUND           not_found
    ├── Conflict                    409  FAILED_PRECONDITION conflict
    ├── Overloaded                  429  RESOURCE_EXHAUSTED  overloaded        retryable
    ├── BackendUnavailable          503  UNAVAILABLE         backend_unavailable retryable
    │   └── BackendTimeout          503  UNAVAILABLE         backend_timeout   retryable
    └── BackendError                500  INTERNAL            backend_error
                                    (a backend rejected a statement: a bug, not an outage)

`ConfigError` is not in the tree: it only stops start-up, with a one-line message.

The codes are members of the registry `mlrun.wire.error_codes.ErrorCode` (typed so, so mypy
refuses a free string). Must not import anything beyond the standard library and that registry.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from mlrun.wire.error_codes import ErrorCode


class GrpcCode(enum.IntEnum):
    """gRPC status codes (the numbers are fixed by the gRPC spec)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ConfigError(Exception):
    """A bad or missing setting; the message is one line naming the variable."""


class MlrunError(Exception):
    """Base of every error a client can see."""

    http_status: ClassVar[int] = 500
    grpc_code: ClassVar[GrpcCode] = GrpcCode.INTERNAL
    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL
    retryable: ClassVar[bool] = False

    def __init__(
        self, message: str, *, code: ErrorCode | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code: ErrorCode = code or self.default_code
        self.field = field


class InvalidInput(MlrunError):
    http_status = 400
    grpc_code = GrpcCode.INVALID_ARGUMENT
    default_code = ErrorCode.INVALID_ARGUMENT


class PayloadTooLarge(InvalidInput):
    http_status = 413
    default_code = ErrorCode.PAYLOAD_TOO_LARGE


class HeadersTooLarge(InvalidInput):
    """The request line and headers together are over the documented limit (16 KiB)."""

    http_status = 431
    default_code = ErrorCode.HEADERS_TOO_LARGE


class Unauthenticated(MlrunError):
    http_status = 401
    grpc_code = GrpcCode.UNAUTHENTICATED
    default_code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(MlrunError):
    http_status = 403
    grpc_code = GrpcCode.PERMISSION_DENIED
    default_code = ErrorCode.PERMISSION_DENIED


class NotFound(MlrunError):
    http_status = 404
    grpc_code = GrpcCode.NOT_FOUND
    default_code = ErrorCode.NOT_FOUND


class Conflict(MlrunError):
    http_status = 409
    grpc_code = GrpcCode.FAILED_PRECONDITION
    default_code = ErrorCode.CONFLICT


class Overloaded(MlrunError):
    """A pipeline is full: the client should wait `retry_after_s` and send the same batch again."""

    http_status = 429
    grpc_code = GrpcCode.RESOURCE_EXHAUSTED
    default_code = ErrorCode.OVERLOADED
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = max(1, retry_after_s)


class BackendUnavailable(MlrunError):
    """A backend could not be reached or did not answer; nothing acknowledged was lost."""

    http_status = 503
    grpc_code = GrpcCode.UNAVAILABLE
    default_code = ErrorCode.BACKEND_UNAVAILABLE
    retryable = True

    def __init__(self, message: str, *, backend: str, code: ErrorCode | None = None) -> None:
        super().__init__(message, code=code)
        self.backend = backend


class BackendTimeout(BackendUnavailable):
    default_code = ErrorCode.BACKEND_TIMEOUT


class BackendError(MlrunError):
    """A backend answered with an error for a statement (our bug or corrupt state, not an outage).

    The backend's own text is kept in `detail` for the server log only; clients see `message`.
    """

    default_code = ErrorCode.BACKEND_ERROR

    def __init__(
        self, message: str, *, backend: str, detail: str = "", backend_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.backend = backend
        self.detail = detail
        self.backend_code = backend_code
