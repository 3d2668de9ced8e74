"""The registry of machine-readable codes the server answers with: error codes (HTTP
`{"error": {"code": ...}}`, gRPC trailing metadata `mlrun-error-code`) and warning codes
(`warnings[].code` of an ingest answer).

These strings are a stable contract: clients branch on them. The server uses only these
members (a test scans `mlrun/` for any other code), the OpenAPI document lists them as the
enum of an error's `code`, and the README's "Error codes" table is generated from `CATALOGUE`
(`python -m mlrun.wire.error_codes` prints it; a test compares).

Must not import the server or the SDK: both sides may read it.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    # 400: the request itself is wrong; resending it cannot help
    INVALID_ARGUMENT = "invalid_argument"
    INVALID_FIELD = "invalid_field"
    MALFORMED_JSON = "malformed_json"
    INVALID_GZIP = "invalid_gzip"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    VALUE_TOO_LONG = "value_too_long"
    SERIES_LENGTH_MISMATCH = "series_length_mismatch"
    TOO_MANY_FILTER_TERMS = "too_many_filter_terms"
    TOO_MANY_RUNS = "too_many_runs"
    INVALID_CURSOR = "invalid_cursor"
    PARTS_REQUIRED = "parts_required"
    UNEXPECTED_PARTS = "unexpected_parts"
    INVALID_PARTS = "invalid_parts"
    DUPLICATE_CREDENTIALS = "duplicate_credentials"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_POINTS = "too_many_points"
    HEADERS_TOO_LARGE = "headers_too_large"
    # 401 / 403
    UNAUTHENTICATED = "unauthenticated"
    MISSING_CREDENTIALS = "missing_credentials"
    MALFORMED_CREDENTIALS = "malformed_credentials"
    INVALID_CREDENTIALS = "invalid_credentials"
    KEY_EXPIRED = "key_expired"
    PERMISSION_DENIED = "permission_denied"
    MISSING_SCOPE = "missing_scope"
    WRONG_PROJECT = "wrong_project"
    INVALID_SIGNATURE = "invalid_signature"
    # 404 / 405
    NOT_FOUND = "not_found"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RUN_NOT_FOUND = "run_not_found"
    PROJECT_NOT_FOUND = "project_not_found"
    ARTIFACT_NOT_FOUND = "artifact_not_found"
    KEY_NOT_FOUND = "key_not_found"
    PURGE_JOB_NOT_FOUND = "purge_job_not_found"
    # 409: the request conflicts with what is stored
    CONFLICT = "conflict"
    BATCH_CONFLICT = "batch_conflict"
    RUN_FINISHED = "run_finished"
    RUN_PROJECT_MISMATCH = "run_project_mismatch"
    PROJECT_EXISTS = "project_exists"
    TOO_MANY_KEYS = "too_many_keys"
    NAME_CONFLICT = "name_conflict"
    OBJECT_MISSING = "object_missing"
    SIZE_MISMATCH = "size_mismatch"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    ARTIFACT_FINALIZED = "artifact_finalized"
    ARTIFACT_NOT_FINALIZED = "artifact_not_finalized"
    ARTIFACT_MODIFIED = "artifact_modified"
    RUN_DELETING = "run_deleting"
    # 429 / 503 / 504: retry the same request later
    OVERLOADED = "overloaded"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    BACKEND_TIMEOUT = "backend_timeout"
    COMMIT_TIMEOUT = "commit_timeout"
    SHUTTING_DOWN = "shutting_down"
    KEYS_UNAVAILABLE = "keys_unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    # 500 (our bug or a backend refusing a statement) and 499
    INTERNAL = "internal"
    BACKEND_ERROR = "backend_error"
    CLIENT_DISCONNECTED = "client_disconnected"
    # warnings: the batch was accepted, in part
    NON_FINITE_VALUE = "non_finite_value"
    NOT_DEDUPLICATED = "not_deduplicated"
    PARAM_CONFLICT = "param_conflict"
    METRIC_NAMES_LIMIT = "metric_names_limit"
    TAG_KEYS_LIMIT = "tag_keys_limit"
    PROJECT_TAGS_LIMIT = "project_tags_limit"


# code -> (HTTP status, or "warning"; what it means)
CATALOGUE: dict[ErrorCode, tuple[str, str]] = {
    ErrorCode.INVALID_ARGUMENT: (
        "400", "a request that is not valid (gRPC: also a malformed protobuf)"),
    ErrorCode.INVALID_FIELD: ("400", "a field, parameter or value is wrong; `field` names it"),
    ErrorCode.MALFORMED_JSON: ("400", "the body is not the JSON the route expects"),
    ErrorCode.INVALID_GZIP: ("400", "a `Content-Encoding: gzip` body that does not decompress"),
    ErrorCode.UNSUPPORTED_ENCODING: ("400", "a `Content-Encoding` other than gzip or identity"),
    ErrorCode.VALUE_TOO_LONG: (
        "400", "a name or value over its length limit in characters or UTF-8 bytes"),
    ErrorCode.SERIES_LENGTH_MISMATCH: ("400", "a columnar series whose arrays differ in length"),
    ErrorCode.TOO_MANY_FILTER_TERMS: ("400", "more `tags` or `params` terms than a listing allows"),
    ErrorCode.TOO_MANY_RUNS: (
        "400", "a metric sort over more runs than allowed: narrow the filter"),
    ErrorCode.INVALID_CURSOR: ("400", "a cursor that was not issued for this request"),
    ErrorCode.PARTS_REQUIRED: ("400", "a multipart artifact finalized without its parts"),
    ErrorCode.UNEXPECTED_PARTS: ("400", "parts sent to finalize a single-PUT artifact"),
    ErrorCode.INVALID_PARTS: (
        "400", "parts the artifact store refused (missing, too small, wrong ETag)"),
    ErrorCode.DUPLICATE_CREDENTIALS: (
        "400", "more than one credential (a repeated `Authorization` or `X-API-Key`, or both)"),
    ErrorCode.PAYLOAD_TOO_LARGE: (
        "413", "a body or gRPC message over its size limit (gRPC: INVALID_ARGUMENT)"),
    ErrorCode.TOO_MANY_POINTS: ("413", "a batch with more points than allowed"),
    ErrorCode.HEADERS_TOO_LARGE: ("431", "a request line and headers over 16 KiB"),
    ErrorCode.UNAUTHENTICATED: ("401", "not authenticated"),
    ErrorCode.MISSING_CREDENTIALS: ("401", "no API key was sent"),
    ErrorCode.MALFORMED_CREDENTIALS: (
        "401", "an `Authorization` header that is not `Bearer <key>`"),
    ErrorCode.INVALID_CREDENTIALS: ("401", "an unknown or revoked API key"),
    ErrorCode.KEY_EXPIRED: ("401", "an API key past its expiry"),
    ErrorCode.PERMISSION_DENIED: ("403", "not allowed"),
    ErrorCode.MISSING_SCOPE: ("403", "the key lacks the scope the call needs"),
    ErrorCode.WRONG_PROJECT: ("403", "the key is limited to another project than the one named"),
    ErrorCode.INVALID_SIGNATURE: (
        "403", "a local-store URL that is invalid, tampered with or expired"),
    ErrorCode.NOT_FOUND: ("404", "nothing there"),
    ErrorCode.ROUTE_NOT_FOUND: ("404", "no such route"),
    ErrorCode.METHOD_NOT_ALLOWED: ("405", "the route exists, not with this method"),
    ErrorCode.RUN_NOT_FOUND: ("404", "no such run (also another project's run, for a scoped key)"),
    ErrorCode.PROJECT_NOT_FOUND: ("404", "no such project"),
    ErrorCode.ARTIFACT_NOT_FOUND: ("404", "no such artifact in this run"),
    ErrorCode.KEY_NOT_FOUND: ("404", "no such API key (in the caller's project)"),
    ErrorCode.PURGE_JOB_NOT_FOUND: ("404", "no such purge job (in the caller's project)"),
    ErrorCode.CONFLICT: ("409", "conflicts with what is stored"),
    ErrorCode.BATCH_CONFLICT: ("409", "a `batch_id` received before with a different payload"),
    ErrorCode.RUN_FINISHED: ("409", "the run is finished; it takes no more data"),
    ErrorCode.RUN_PROJECT_MISMATCH: (
        "409", "the `run_id` is already used by a run of another project"),
    ErrorCode.PROJECT_EXISTS: ("409", "a project of that name exists"),
    ErrorCode.TOO_MANY_KEYS: ("409", "the cap on usable API keys is reached; revoke some"),
    ErrorCode.NAME_CONFLICT: ("409", "an artifact name collides with an existing artifact path"),
    ErrorCode.OBJECT_MISSING: ("409", "finalize before the object was uploaded"),
    ErrorCode.SIZE_MISMATCH: ("409", "the uploaded object's size differs from the declared one"),
    ErrorCode.CHECKSUM_MISMATCH: (
        "409", "the uploaded object's SHA-256 differs from the declared one"),
    ErrorCode.ARTIFACT_FINALIZED: ("409", "a finalized artifact cannot be aborted"),
    ErrorCode.ARTIFACT_NOT_FINALIZED: ("409", "a download of an artifact not finalized yet"),
    ErrorCode.ARTIFACT_MODIFIED: (
        "409", "a finalized artifact's object was changed in the store itself"),
    ErrorCode.RUN_DELETING: (
        "409", "the `run_id` belongs to a deleted run still being purged; retry after its purge"),
    ErrorCode.OVERLOADED: (
        "429", "the ingest pipeline is full: wait `Retry-After`, resend the same batch"),
    ErrorCode.BACKEND_UNAVAILABLE: ("503", "a backend is down or unreachable; retryable"),
    ErrorCode.BACKEND_TIMEOUT: ("503", "a backend did not answer in time; retryable"),
    ErrorCode.COMMIT_TIMEOUT: ("503", "admitted but not committed in time; resend the same batch"),
    ErrorCode.SHUTTING_DOWN: ("503", "the server is stopping; retry elsewhere or later"),
    ErrorCode.KEYS_UNAVAILABLE: (
        "503", "the key view could not be refreshed for too long; retryable"),
    ErrorCode.DEADLINE_EXCEEDED: (
        "504", "the client's gRPC deadline passed (gRPC: DEADLINE_EXCEEDED)"),
    ErrorCode.INTERNAL: ("500", "a bug of ours; the server log has the details"),
    ErrorCode.BACKEND_ERROR: (
        "500", "a backend refused a statement (a bug or corrupt state, not an outage)"),
    ErrorCode.CLIENT_DISCONNECTED: ("499", "the client went away before the answer (logged only)"),
    ErrorCode.NON_FINITE_VALUE: ("warning", "NaN or ±Infinity values were dropped"),
    ErrorCode.NOT_DEDUPLICATED: (
        "warning", "a batch without `batch_id`: a retry would be stored twice"),
    ErrorCode.PARAM_CONFLICT: ("warning", "a param already set to another value was not changed"),
    ErrorCode.METRIC_NAMES_LIMIT: ("warning", "new metric names past the run's limit were dropped"),
    ErrorCode.TAG_KEYS_LIMIT: ("warning", "new tag keys past the run's limit were dropped"),
    ErrorCode.PROJECT_TAGS_LIMIT: ("warning", "new tag keys past the project's limit were dropped"),
}


def markdown_table() -> str:
    """The README's "Error codes" table."""
    lines = ["| code | HTTP | meaning |", "|---|---|---|"]
    lines += [f"| `{code}` | {status} | {meaning} |"
              for code, (status, meaning) in CATALOGUE.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
