"""ClickHouse over HTTP, without I/O: SQL literals, requests, RowBinary rows, errors, results.

Owns: quoting values and identifiers into SQL (18.16 has no `{p:Type}` parameters, so every
value is escaped here, client-side); the HTTP request for a query or an insert (URL parameters,
headers, optionally gzipped body); RowBinary encoding, with a fast path for the metric tables,
and Native blocks of the metric tables (what the ingest writers send);
parsing ClickHouse errors, both a non-200 body and an exception written into a 200 body after
streaming started; decoding JSONEachRow results, and RowBinary results of string and numeric
array columns (a series' points: each array one C-level copy, never a parsed number per
point). The embedded transport (chdb) reuses the SQL, the row encoding and the error parsing.

Must not import anyio, httpx, chdb or anything else that does I/O; everything here is a plain
function of its arguments, unit-tested without an event loop.

Invariants:
- `quote_string` output, pasted into SQL, reads back as exactly the input on 18.16 and on 26.
- The client never sends settings that only one server generation knows (for instance
  `allow_experimental_low_cardinality_type`: 18.16 needs it in its profile, 26 rejects it).
- Result formats are chosen with a FORMAT clause in the SQL: 18.16 ignores the
  X-ClickHouse-Format and X-ClickHouse-Database headers.
"""

from __future__ import annotations

import array
import gzip
import math
import re
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

# --------------------------------------------------------------------------- SQL literals

SqlValue = str | int | float | bool | None

# Escapes understood by the SQL lexer of 18.16 and of current ClickHouse alike. Backslash and
# quote must be escaped; NUL and line breaks are escaped so a statement stays one readable line
# in server logs. Everything else (all of Unicode) is sent as UTF-8.
_STRING_ESCAPES: Final = str.maketrans(
    {"\\": "\\\\", "'": "\\'", "\0": "\\0", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
)
_IDENTIFIER_ESCAPES: Final = str.maketrans({"\\": "\\\\", "`": "\\`", "\0": "\\0"})


def quote_string(value: str) -> str:
    """A single-quoted ClickHouse string literal for `value`."""
    return "'" + value.translate(_STRING_ESCAPES) + "'"


def quote_identifier(name: str) -> str:
    """A back-quoted identifier (table, column or database name)."""
    if not name:
        raise ValueError("an identifier cannot be empty")
    return "`" + name.translate(_IDENTIFIER_ESCAPES) + "`"


def quote_value(value: SqlValue) -> str:
    """A SQL literal for one Python value. bool becomes 1/0 (18.16 has no Bool type)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)  # repr round-trips a float exactly
    if isinstance(value, str):
        return quote_string(value)
    raise TypeError(f"cannot quote a {type(value).__name__} as a ClickHouse literal")


def quote_list(values: Iterable[SqlValue]) -> str:
    """`(v1, v2, ...)` for `IN` lists and VALUES rows; an empty list is an error (invalid SQL)."""
    quoted = [quote_value(v) for v in values]
    if not quoted:
        raise ValueError("an empty list has no ClickHouse literal; handle it before building SQL")
    return "(" + ", ".join(quoted) + ")"


def with_format(sql: str, output_format: str) -> str:
    """`sql` with a trailing FORMAT clause (the only way to pick a format that 18.16 honours)."""
    return sql.strip().rstrip(";").rstrip() + " FORMAT " + output_format


def insert_prefix(table: str, columns: Sequence[str]) -> str:
    """`INSERT INTO t (a, b)`, the form chdb's streaming insert takes (format passed apart)."""
    if not columns:
        raise ValueError("an insert needs at least one column")
    names = ", ".join(quote_identifier(c) for c in columns)
    return f"INSERT INTO {quote_identifier(table)} ({names})"


def insert_statement(table: str, columns: Sequence[str], input_format: str = "RowBinary") -> str:
    """`INSERT INTO t (a, b) FORMAT RowBinary`; the data travels separately (the HTTP body)."""
    return f"{insert_prefix(table, columns)} FORMAT {input_format}"


# --------------------------------------------------------------------------- HTTP requests


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """One POST to the ClickHouse HTTP interface, ready to hand to any HTTP client."""

    params: tuple[tuple[str, str], ...]
    headers: tuple[tuple[str, str], ...]
    body: bytes


def auth_headers(user: str, password: str) -> dict[str, str]:
    """Credentials as headers, so they never appear in URLs (and in access logs)."""
    return {"X-ClickHouse-User": user, "X-ClickHouse-Key": password}


def deadline_settings(timeout_s: float) -> dict[str, str]:
    """Settings that make the server give up on its own when the client's deadline passes, so an
    abandoned query does not keep running. Whole seconds: 18.16 reads the setting as an integer."""
    return {"max_execution_time": str(max(1, math.ceil(timeout_s)))}


def build_query_request(
    sql: str, *, database: str | None, settings: Mapping[str, str] | None = None
) -> HttpRequest:
    """A statement sent as the POST body (POST: GET requests are read-only on ClickHouse)."""
    params = _params(database, settings)
    return HttpRequest(params=params, headers=(), body=sql.encode("utf-8"))


def build_insert_request(
    table: str,
    columns: Sequence[str],
    body: bytes,
    *,
    database: str | None,
    settings: Mapping[str, str] | None = None,
    input_format: str = "RowBinary",
    gzip_level: int | None = None,
) -> HttpRequest:
    """An insert: the statement goes in the `query=` URL parameter, the rows in the body.

    `gzip_level` compresses the body (Content-Encoding: gzip, which 18.16 decodes without any
    setting); it pays only when the network, not the CPU, is the bottleneck.
    """
    statement = insert_statement(table, columns, input_format)
    params = (("query", statement), *_params(database, settings))
    if gzip_level is None:
        return HttpRequest(params=params, headers=(), body=body)
    compressed = gzip.compress(body, compresslevel=gzip_level)
    return HttpRequest(params=params, headers=(("Content-Encoding", "gzip"),), body=compressed)


def _params(
    database: str | None, settings: Mapping[str, str] | None
) -> tuple[tuple[str, str], ...]:
    params: list[tuple[str, str]] = []
    if database is not None:
        params.append(("database", database))
    if settings:
        params.extend(settings.items())
    return tuple(params)


# --------------------------------------------------------------------------- RowBinary

ColumnType = Literal["String", "Int64", "UInt64", "Float64", "Int32", "UInt32", "UInt8"]

# LowCardinality(String) columns take the same RowBinary bytes as String.
_FIXED_FORMATS: Final[dict[str, str]] = {
    "Int64": "q",
    "UInt64": "Q",
    "Float64": "d",
    "Int32": "i",
    "UInt32": "I",
    "UInt8": "B",
}

# Lengths below 128 are one LEB128 byte; precomputed because nearly every string is that short.
_SHORT_VARINTS: Final = tuple(bytes((n,)) for n in range(128))

# Column order of the `metrics` and `system_metrics` tables as `encode_metric_rows` writes it.
METRIC_COLUMNS: Final = ("run_id", "name", "step", "value", "timestamp_ms", "version")
MetricRow = tuple[str, str, int, float, int, int]
_METRIC_TAIL: Final = struct.Struct("<qdqQ")  # step Int64, value Float64, timestamp_ms, version


def encode_varint(value: int) -> bytes:
    """Unsigned LEB128, as RowBinary prefixes string lengths."""
    if value < 0:
        raise ValueError("a varint cannot be negative")
    if value < 128:
        return _SHORT_VARINTS[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(value: str) -> bytes:
    """A RowBinary String: varint byte length, then UTF-8 bytes."""
    raw = value.encode("utf-8")
    return encode_varint(len(raw)) + raw


def encode_rowbinary(rows: Iterable[Sequence[Any]], column_types: Sequence[ColumnType]) -> bytes:
    """RowBinary bytes for `rows`, each a sequence of values in `column_types` order.

    Consecutive fixed-width columns are packed by one precompiled `struct.Struct`.
    Raises ValueError naming the row when a value does not fit its column type.
    """
    plan = _row_plan(column_types)
    parts: list[bytes] = []
    append = parts.append
    for index, row in enumerate(rows):
        if len(row) != len(column_types):
            raise ValueError(f"row {index} has {len(row)} values for {len(column_types)} columns")
        try:
            for start, stop, packer in plan:
                if packer is None:
                    append(encode_string(row[start]))
                else:
                    append(packer.pack(*row[start:stop]))
        except (struct.error, AttributeError, TypeError) as exc:
            raise ValueError(f"row {index} does not match {list(column_types)}: {exc}") from exc
    return b"".join(parts)


def _row_plan(column_types: Sequence[ColumnType]) -> list[tuple[int, int, struct.Struct | None]]:
    """(first column, end column, packer) per segment: None for one String, else one Struct for a
    run of consecutive fixed-width columns."""
    plan: list[tuple[int, int, struct.Struct | None]] = []
    run_start = -1
    letters = ""
    for index, column_type in enumerate(column_types):
        if column_type == "String":
            if letters:
                plan.append((run_start, index, struct.Struct("<" + letters)))
                letters = ""
            plan.append((index, index + 1, None))
            continue
        letter = _FIXED_FORMATS.get(column_type)
        if letter is None:
            raise ValueError(f"unsupported RowBinary column type {column_type!r}")
        if not letters:
            run_start = index
        letters += letter
    if letters:
        plan.append((run_start, len(column_types), struct.Struct("<" + letters)))
    return plan


def encode_metric_rows(rows: Iterable[MetricRow]) -> bytes:
    """RowBinary for (run_id, name, step, value, timestamp_ms, version) rows: the `metrics` and
    `system_metrics` columns in `METRIC_COLUMNS` order.

    The fast path: a batch repeats few (run_id, name) pairs, so their encoded bytes are cached per
    call, and the four numbers are packed by one precompiled Struct (~3M rows/s on one core).
    """
    parts: list[bytes] = []
    append = parts.append
    prefixes: dict[tuple[str, str], bytes] = {}
    pack = _METRIC_TAIL.pack
    try:
        for run_id, name, step, value, timestamp_ms, version in rows:
            prefix = prefixes.get((run_id, name))
            if prefix is None:
                prefix = prefixes[(run_id, name)] = encode_string(run_id) + encode_string(name)
            append(prefix)
            append(pack(step, value, timestamp_ms, version))
    except (struct.error, AttributeError, TypeError) as exc:
        raise ValueError(f"metric row {len(parts) // 2} cannot be encoded: {exc}") from exc
    return b"".join(parts)


# --------------------------------------------------------------------------- Native blocks

# LowCardinality in the Native format (18.16 and later alike): a per-column state prefix (the
# keys-serialization version; 1 = shared dictionaries with additional keys), then per block the
# index type with its flags, the block's own dictionary ("additional keys") and one index per
# row into it. The smallest unsigned width that holds every index is chosen.
_LOW_CARDINALITY_KEYS_VERSION: Final = 1
_LOW_CARDINALITY_HAS_ADDITIONAL_KEYS: Final = 1 << 9
_LOW_CARDINALITY_INDEX_WIDTHS: Final = ((1 << 8, 0, "B"), (1 << 16, 1, "H"), (1 << 32, 2, "I"))
_UINT64: Final = struct.Struct("<Q")


def _column_bytes(typecode: str, values: Sequence[Any]) -> bytes:
    packed = array.array(typecode, values)
    if _SWAP:  # Native, like RowBinary, is little-endian
        packed.byteswap()
    return packed.tobytes()


def _native_column(name: str, type_name: str, data: bytes) -> bytes:
    return encode_string(name) + encode_string(type_name) + data


def _low_cardinality_strings(values: Sequence[str]) -> bytes:
    keys: dict[str, int] = {}
    add = keys.setdefault
    indexes = [add(value, len(keys)) for value in values]
    width = next((w for w in _LOW_CARDINALITY_INDEX_WIDTHS if len(keys) <= w[0]), None)
    if width is None:
        raise ValueError("too many distinct strings for one LowCardinality block")
    _, index_type, typecode = width
    return b"".join((
        _UINT64.pack(_LOW_CARDINALITY_KEYS_VERSION),
        _UINT64.pack(index_type | _LOW_CARDINALITY_HAS_ADDITIONAL_KEYS),
        _UINT64.pack(len(keys)),
        b"".join(encode_string(key) for key in keys),
        _UINT64.pack(len(indexes)),
        _column_bytes(typecode, indexes),
    ))


def encode_metric_block(run_id: str, names: Sequence[str], steps: Sequence[int],
                        values: Sequence[float], timestamps_ms: Sequence[int],
                        versions: Sequence[int]) -> bytes:
    """One Native block of the `metrics` / `system_metrics` columns (`METRIC_COLUMNS`) for one
    run's points: `INSERT ... FORMAT Native` takes any number of them back to back, and
    ClickHouse squashes them into one part per table.

    Columnar, so the numbers are packed by `array` in C, not one `struct.pack` per row: about
    half the CPU of `encode_metric_rows` for a 1000-point batch, and ClickHouse copies the
    columns instead of parsing rows. Raises ValueError when a value does not fit its column.
    """
    rows = len(steps)
    if not len(names) == len(values) == len(timestamps_ms) == len(versions) == rows:
        raise ValueError("metric columns of different lengths")
    if rows == 0:
        return b""
    try:
        return b"".join((
            encode_varint(len(METRIC_COLUMNS)),
            encode_varint(rows),
            _native_column("run_id", "String", encode_string(run_id) * rows),
            _native_column("name", "LowCardinality(String)", _low_cardinality_strings(names)),
            _native_column("step", "Int64", _column_bytes("q", steps)),
            _native_column("value", "Float64", _column_bytes("d", values)),
            _native_column("timestamp_ms", "Int64", _column_bytes("q", timestamps_ms)),
            _native_column("version", "UInt64", _column_bytes("Q", versions)),
        ))
    except (OverflowError, TypeError, AttributeError) as exc:
        raise ValueError(f"metric columns cannot be encoded: {exc}") from exc


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True, slots=True)
class ClickHouseError:
    """What the server said: its error code (None when the text carried none) and message."""

    code: int | None
    message: str


# ClickHouse error codes that say "try again later", not "this statement is wrong":
# TIMEOUT_EXCEEDED (max_execution_time hit), TOO_MANY_SIMULTANEOUS_QUERIES, TOO_MANY_PARTS
# (inserts outpace merges: the classic ClickHouse backpressure signal), SOCKET_TIMEOUT,
# NETWORK_ERROR, ALL_CONNECTION_TRIES_FAILED. The storage layer maps these to BackendUnavailable.
TIMEOUT_ERROR_CODES: Final = frozenset({159, 209})
TRANSIENT_ERROR_CODES: Final = frozenset({159, 202, 209, 210, 252, 279})

# "Code: 62, e.displayText() = DB::Exception: ..., e.what() = DB::Exception"  (18.16)
# "Code: 62. DB::Exception: ... (SYNTAX_ERROR) (version 26.9.2.1)"             (modern, chdb)
_CODE: Final = re.compile(r"Code: (?P<code>\d+)(?:, e\.displayText\(\) = |\. )")
_LINE_START_CODE: Final = re.compile(r"^Code: \d+(?:, e\.displayText\(\) = |\. )", re.MULTILINE)
_LEGACY_WHAT: Final = re.compile(r", e\.what\(\) = [\w:]+\s*$")
_EXCEPTION_MARKER: Final = "__exception__"
# 25.11+ closes the marker block with "<message length> <tag>" before the final marker.
_MARKER_TRAILER: Final = re.compile(r"\n\d+ \S+\s*$")
# A mid-stream exception is written at the very end of the body; scan only the tail.
_BODY_SCAN_BYTES: Final = 64 * 1024


def parse_error(text: str, *, code_header: str | None = None) -> ClickHouseError:
    """The error in a non-200 response body (or a chdb exception's text, which may carry a
    prefix like 'Streaming insert finish failed: '). `code_header` is X-ClickHouse-Exception-Code,
    which servers newer than 18.16 send."""
    header_code = int(code_header) if code_header and code_header.strip().isdigit() else None
    match = _CODE.search(text)
    if match is None:
        return ClickHouseError(code=header_code, message=text.strip())
    code = header_code if header_code is not None else int(match["code"])
    return ClickHouseError(code=code, message=_clean_message(text[match.end() :]))


def find_error_in_body(body: bytes) -> ClickHouseError | None:
    """An exception the server wrote into a 200 body after it had started streaming rows.

    18.16 and pre-25 servers append a last line `Code: N...`; 25.x put a `__exception__` line
    before it; 25.11+ wrap it as `__exception__<tag>` ... `<length> <tag>__exception__`.
    Result lines in JSONEachRow start with `{`, so a line starting with `Code: N` is never data.
    """
    tail = body[-_BODY_SCAN_BYTES:]
    if b"Code: " not in tail:
        return None
    text = tail.decode("utf-8", errors="replace")
    marker_at = text.find(_EXCEPTION_MARKER)
    if marker_at != -1:
        block = text[marker_at + len(_EXCEPTION_MARKER) :]
        closing_at = block.find(_EXCEPTION_MARKER)
        if closing_at != -1:
            block = _MARKER_TRAILER.sub("", block[:closing_at])
        match = _CODE.search(block)
        if match is not None:
            message = _clean_message(block[match.end() :])
            return ClickHouseError(code=int(match["code"]), message=message)
    matches = list(_LINE_START_CODE.finditer(text))
    last = matches[-1] if matches else None
    if last is None or "DB::Exception" not in text[last.start() :]:
        return None
    return parse_error(text[last.start() :])


def _clean_message(rest: str) -> str:
    message = _LEGACY_WHAT.sub("", rest.strip())
    return message.removeprefix("DB::Exception: ").strip()


# --------------------------------------------------------------------------- results

_ROWS_DECODER: Final = msgspec.json.Decoder(dict[str, Any])


def decode_json_each_row(body: bytes) -> list[dict[str, Any]]:
    """Rows of a `FORMAT JSONEachRow` result. Int64/UInt64 arrive as JSON numbers (the 18.16
    profile sets output_format_json_quote_64bit_integers=0; 26 does so by default) and decode to
    int. Raises ValueError on anything that is not JSONEachRow."""
    if not body.strip():
        return []
    try:
        return _ROWS_DECODER.decode_lines(body)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a JSONEachRow result: {exc}") from exc


# RowBinary column types `decode_row_binary` reads: what the read path's point and bucket
# queries return (cast to these exact types in their SQL).
RowBinaryType = Literal["String", "Int64", "Float64", "Array(Int64)", "Array(Float64)"]
_ARRAY_CODES: Final[dict[str, str]] = {"Array(Int64)": "q", "Array(Float64)": "d"}
_SCALARS: Final[dict[str, struct.Struct]] = {"Int64": struct.Struct("<q"),
                                             "Float64": struct.Struct("<d")}
_SWAP: Final = sys.byteorder != "little"  # RowBinary is little-endian


def decode_varint(body: bytes, at: int) -> tuple[int, int]:
    """An unsigned LEB128 number at `at`: (value, offset after it)."""
    value = shift = 0
    while True:
        if at >= len(body) or shift > 63:
            raise ValueError("truncated RowBinary: a length runs past the end")
        byte = body[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def decode_row_binary(body: bytes, types: Sequence[RowBinaryType]) -> list[list[Any]]:
    """Rows of a `FORMAT RowBinary` result whose columns have `types`. Arrays decode to lists
    of int / float with one C-level copy each (`array.array`), so a 100k-point column costs a
    few hundred microseconds, not a parsed JSON number per point. Raises ValueError when the
    body does not hold whole rows of exactly these types."""
    if not types:
        raise ValueError("RowBinary rows need at least one column type")
    rows: list[list[Any]] = []
    at, end = 0, len(body)
    while at < end:
        row: list[Any] = []
        for kind in types:
            code = _ARRAY_CODES.get(kind)
            if code is not None:
                count, at = decode_varint(body, at)
                stop = at + 8 * count
                if stop > end:
                    raise ValueError(f"truncated RowBinary: an {kind} of {count} runs past the end")
                column = array.array(code)
                column.frombytes(body[at:stop])
                if _SWAP:
                    column.byteswap()
                row.append(column.tolist())
                at = stop
            elif kind == "String":
                size, at = decode_varint(body, at)
                if at + size > end:
                    raise ValueError("truncated RowBinary: a String runs past the end")
                row.append(body[at:at + size].decode("utf-8"))
                at += size
            else:
                scalar = _SCALARS[kind]
                if at + scalar.size > end:
                    raise ValueError(f"truncated RowBinary: an {kind} runs past the end")
                row.append(scalar.unpack_from(body, at)[0])
                at += scalar.size
        rows.append(row)
    return rows
