"""MLflow's answers: its error shape and codes, its request decoding, and its credentials.

Errors: `{"error_code": "<MLflow ErrorCode>", "message": "..."}` with MLflow's status for the
code, mapped from our error tree:

    InvalidInput (400, 413, 431), Conflict other than project_exists  400 INVALID_PARAMETER_VALUE
    Conflict project_exists                                          400 RESOURCE_ALREADY_EXISTS
    Unauthenticated                                                   401 UNAUTHENTICATED
    PermissionDenied                                                  403 PERMISSION_DENIED
    NotFound route_not_found, MethodNotAllowed                        404 ENDPOINT_NOT_FOUND
    NotFound (any other)                                              404 RESOURCE_DOES_NOT_EXIST
    Overloaded                                           429 REQUEST_LIMIT_EXCEEDED + Retry-After
    BackendUnavailable, BackendTimeout                   503 TEMPORARILY_UNAVAILABLE + Retry-After
    anything else                                                     500 INTERNAL_ERROR

Why no permanent error is a 5xx: the client retries 500/502/503/504 seven times over about four
minutes; only a backend outage (503, which a retry can cure) and our own bugs (500) are 5xx.
A 429 and a 503 carry `Retry-After` (whole seconds, at least 1), which the client honours.

Credentials: `Authorization: Bearer <key>` (MLFLOW_TRACKING_TOKEN) as on our own API, and
`Authorization: Basic base64(user:key)` (MLFLOW_TRACKING_USERNAME / _PASSWORD): the password is
the API key, the user name is ignored.

Must not import storage or pipelines.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec

from mlrun.server.edges.http.app import MethodNotAllowed, Request, Response
from mlrun.server.errors import (
    BackendUnavailable,
    Conflict,
    InvalidInput,
    MlrunError,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from mlrun.server.ports.keys import Principal
from mlrun.server.usecases.auth import Authenticator
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.mlflow_messages import ErrorBody, MlflowErrorCode

logger = logging.getLogger("mlrun.mlflow")

T = TypeVar("T")

_STATUS: dict[MlflowErrorCode, int] = {
    MlflowErrorCode.INVALID_PARAMETER_VALUE: 400,
    MlflowErrorCode.RESOURCE_ALREADY_EXISTS: 400,
    MlflowErrorCode.UNAUTHENTICATED: 401,
    MlflowErrorCode.PERMISSION_DENIED: 403,
    MlflowErrorCode.RESOURCE_DOES_NOT_EXIST: 404,
    MlflowErrorCode.ENDPOINT_NOT_FOUND: 404,
    MlflowErrorCode.REQUEST_LIMIT_EXCEEDED: 429,
    MlflowErrorCode.INTERNAL_ERROR: 500,
    MlflowErrorCode.TEMPORARILY_UNAVAILABLE: 503,
}
_encoder = msgspec.json.Encoder()
_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def mlflow_code(exc: MlrunError) -> MlflowErrorCode:
    if isinstance(exc, MethodNotAllowed) or exc.code == ErrorCode.ROUTE_NOT_FOUND:
        return MlflowErrorCode.ENDPOINT_NOT_FOUND
    if isinstance(exc, Conflict):
        return (MlflowErrorCode.RESOURCE_ALREADY_EXISTS if exc.code == ErrorCode.PROJECT_EXISTS
                else MlflowErrorCode.INVALID_PARAMETER_VALUE)
    if isinstance(exc, InvalidInput):
        return MlflowErrorCode.INVALID_PARAMETER_VALUE
    if isinstance(exc, Unauthenticated):
        return MlflowErrorCode.UNAUTHENTICATED
    if isinstance(exc, PermissionDenied):
        return MlflowErrorCode.PERMISSION_DENIED
    if isinstance(exc, NotFound):
        return MlflowErrorCode.RESOURCE_DOES_NOT_EXIST
    if isinstance(exc, Overloaded):
        return MlflowErrorCode.REQUEST_LIMIT_EXCEEDED
    if isinstance(exc, BackendUnavailable):
        return MlflowErrorCode.TEMPORARILY_UNAVAILABLE
    return MlflowErrorCode.INTERNAL_ERROR


def error_response(exc: MlrunError) -> Response:
    code = mlflow_code(exc)
    response = Response(status=_STATUS[code], body=_encoder.encode(
        ErrorBody(error_code=code, message=exc.message)))
    if isinstance(exc, Overloaded):
        response.headers.append(("retry-after", str(exc.retry_after_s)))
    elif isinstance(exc, BackendUnavailable):
        response.headers.append(("retry-after", "1"))
    return response


def json_response(payload: Any) -> Response:
    return Response(status=200, body=_encoder.encode(payload))


def answered(handler: Callable[[Request], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    """The handler with every error rendered in MLflow's shape (a bug too: 500 INTERNAL_ERROR,
    logged with its traceback, no driver text to the client)."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MlrunError as exc:
            if exc.http_status >= 500:
                logger.warning("%s %s -> %s %s", request.method, request.path, exc.http_status,
                               exc.code, exc_info=exc.__cause__ is not None)
            return error_response(exc)
        except Exception:
            logger.exception("unhandled error in %s %s", request.method, request.path)
            return error_response(MlrunError("internal server error"))

    return wrapped


def _decoder(kind: type[T]) -> msgspec.json.Decoder[T]:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    return decoder


def decode_body(body: bytes, kind: type[T]) -> T:
    """A POST body (an empty one is `{}`); a malformed one is 400 INVALID_PARAMETER_VALUE."""
    try:
        return _decoder(kind).decode(body if body.strip() else b"{}")
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid request: {exc}", code=ErrorCode.INVALID_FIELD,
                           field="body") from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}",
                           code=ErrorCode.MALFORMED_JSON, field="body") from None


def decode_query(query: Mapping[str, list[str]], kind: type[T],
                 repeated: frozenset[str] = frozenset()) -> T:
    """GET parameters as MLflow sends them: repeated keys for lists, strings for numbers."""
    data = {name: values if name in repeated else values[-1] for name, values in query.items()}
    try:
        return msgspec.convert(data, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidInput(f"invalid request: {exc}", code=ErrorCode.INVALID_FIELD,
                           field="query") from None


def principal_of(authenticator: Authenticator, headers: Mapping[str, str]) -> Principal:
    """Bearer as on our own API; Basic with the API key as its password."""
    authorization = headers.get("authorization", "").strip()
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthenticated("the Basic credentials are not base64 of user:password",
                                  code=ErrorCode.MALFORMED_CREDENTIALS) from None
        _, colon, password = decoded.partition(":")
        if not colon or not password:
            raise Unauthenticated("Basic auth needs the API key as its password",
                                  code=ErrorCode.MALFORMED_CREDENTIALS)
        headers = {**headers, "authorization": f"Bearer {password}"}
    return authenticator.authenticate(headers)
