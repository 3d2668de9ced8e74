"""Payload validation shared by both edges: JSON bodies (HTTP) and builtins built from protobuf
messages (gRPC) become the same msgspec Structs, with the same errors.

Owns the translation of msgspec's errors into `InvalidInput`: a malformed body is
`malformed_json`; a wrong type or value is `invalid_field` whose `field` names the place in the
payload (`metrics[3].step`). msgspec checks constraints (`Meta(ge=0)`, lengths, patterns) only
while decoding or converting, never when a Struct is constructed directly, which is why the
gRPC edge converts builtins instead of constructing Structs from protobuf fields.

Must not import the edges or storage.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec

from mlrun.server.errors import InvalidInput
from mlrun.wire.error_codes import ErrorCode
from mlrun.wire.schemas import RunId, decoder_for

T = TypeVar("T")

_FIELD_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_PATH_PART = re.compile(r"\[\d+\]|[^.\[\]]+")
# The only way JSON can carry a NUL character is the escape \u0000 (raw control characters are
# invalid JSON). A plain substring search (memchr speed) is the filter: it was a regex with a
# look-behind for escaped backslashes, ~23 % of the server's CPU per ingest request (2.3 ms per
# 1000-point body); the walk of the decoded payload decides, so a false hit costs only a walk.
_JSON_NUL_ESCAPE = b"\\u0000"
# Builtins (the gRPC edge's) get the same filter: msgspec's JSON encoder escapes every NUL as
# \u0000 and runs at C speed (~0.03 µs per number), where the walk visited every number of every
# column in Python (~1.9 µs per gRPC point).
_builtins_encoder = msgspec.json.Encoder()


def _nul_refused(field: str) -> InvalidInput:
    # PostgreSQL text cannot hold NUL; refusing it here keeps it a 400 for every field instead
    # of a storage error later.
    return InvalidInput(f"{field}: text must not contain NUL (\\u0000) characters",
                        code=ErrorCode.INVALID_FIELD, field=field)


def _nul_field(data: Any, path: str = "") -> str | None:
    """The path of the first string holding a NUL character (`tags[2].value`), or None."""
    if isinstance(data, str):
        return (path or "body") if "\x00" in data else None
    if isinstance(data, msgspec.Struct):
        data = {name: getattr(data, name) for name in data.__struct_fields__}
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(key, str) and "\x00" in key:
                return f"{path}.{key!r}".lstrip(".")
            found = _nul_field(value, f"{path}.{key}".lstrip("."))
            if found is not None:
                return found
    elif isinstance(data, list | tuple):
        for index, item in enumerate(data):
            if isinstance(item, str | dict | list | tuple | msgspec.Struct):
                found = _nul_field(item, f"{path}[{index}]")
                if found is not None:
                    return found
    return None


def allowed_values(kind: Any, path: str) -> list[str] | None:
    """The values a Literal field at `path` (`status`, `series[0].method`) of `kind` accepts,
    or None when that field is no Literal (used to list them in the error)."""
    info: Any = msgspec.inspect.type_info(kind)
    for part in _PATH_PART.findall(path):
        while isinstance(info, msgspec.inspect.UnionType):  # `X | None` and the like
            info = next((t for t in info.types if not isinstance(t, msgspec.inspect.NoneType)),
                        info.types[0])
        if part.startswith("["):
            info = getattr(info, "item_type", None)
        elif isinstance(info, msgspec.inspect.StructType):
            info = next((f.type for f in info.fields if f.name == part), None)
        else:
            return None
        if info is None:
            return None
    while isinstance(info, msgspec.inspect.UnionType):
        info = next((t for t in info.types if isinstance(t, msgspec.inspect.LiteralType)), None)
    if isinstance(info, msgspec.inspect.LiteralType):
        return [str(value) for value in info.values]
    return None


def invalid_input(message: str, *, kind: Any, default_field: str,
                  what: str = "") -> InvalidInput:
    """msgspec's validation message as `invalid_field` naming the field; an invalid enum value
    lists the allowed ones. `what` ("query parameter ") says what kind of field it is."""
    found = _FIELD_PATH.search(message)
    field = found["path"].lstrip(".") if found else None
    text = _FIELD_PATH.sub("", message)
    if field and text.startswith("Invalid enum value") \
            and (values := allowed_values(kind, field)) is not None:
        text = f"{text.removeprefix('Invalid enum value ')} is not one of {', '.join(values)}"
    return InvalidInput(f"{what}{field}: {text}" if field else text,
                        code=ErrorCode.INVALID_FIELD, field=field or default_field)


def _invalid(exc: msgspec.ValidationError, *, default_field: str,
             kind: Any = None) -> InvalidInput:
    return invalid_input(str(exc), kind=kind, default_field=default_field)


def decode_json(body: bytes, kind: type[T]) -> T:
    """Decode a JSON body into a schema Struct; errors name the offending field."""
    if not body.strip():
        raise InvalidInput("the request body is empty; a JSON object is expected",
                           code=ErrorCode.MALFORMED_JSON, field="body")
    try:
        decoded = decoder_for(kind).decode(body)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, default_field="body", kind=kind) from None
    except msgspec.DecodeError as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}",
                           code=ErrorCode.MALFORMED_JSON,
                           field="body") from None
    # The byte scan is the cheap filter; only a body that has the escape is walked for the field.
    if _JSON_NUL_ESCAPE in body and (field := _nul_field(decoded)) is not None:
        raise _nul_refused(field)
    return decoded


def _has_nul(data: Any) -> bool:
    """Whether any string in `data` (builtins) may hold a NUL: the cheap filter before the walk.
    A value JSON cannot encode is walked (the walk decides)."""
    try:
        return _JSON_NUL_ESCAPE in _builtins_encoder.encode(data)
    except (TypeError, ValueError, OverflowError):
        return True


def convert(data: Any, kind: type[T]) -> T:
    """Validate builtins (dicts, lists, scalars) into a schema Struct, constraints included."""
    if _has_nul(data) and (field := _nul_field(data)) is not None:
        raise _nul_refused(field)
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, default_field="request", kind=kind) from None


def run_id(value: str, *, field: str = "run_id") -> str:
    try:
        return msgspec.convert(value, RunId)
    except msgspec.ValidationError:
        raise InvalidInput("run_id must be 1-64 letters, digits, '_', '.' or '-'",
                           code=ErrorCode.INVALID_FIELD, field=field) from None
