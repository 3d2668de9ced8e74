"""Parameters of the lifecycle calls as both edges receive them (HTTP path parameters, gRPC
fields): a project name and a purge job id, validated into 400 `invalid_field` naming the field.
Must not import storage, use-cases or either edge's transport.
"""

from __future__ import annotations

import re

import msgspec

from mlrun.server.errors import InvalidInput
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import ProjectName

_JOB_ID = re.compile(r"^purge_[0-9a-f]{1,40}$")


def project_name(value: str, *, field: str = "project") -> str:
    try:
        return msgspec.convert(value, ProjectName)
    except msgspec.ValidationError:
        raise InvalidInput("project must be 1-100 letters, digits, '_', '.' or '-'",
                           code=ErrorCode.INVALID_FIELD, field=field) from None


def job_id(value: str, *, field: str = "job_id") -> str:
    if not _JOB_ID.match(value):
        raise InvalidInput("job_id must look like purge_<hex>", code=ErrorCode.INVALID_FIELD,
                           field=field)
    return value
