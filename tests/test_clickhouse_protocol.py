"""Pure ClickHouse protocol code: quoting, requests, RowBinary bytes, error parsing, results.

No server and no event loop: every expectation is computed by hand here (the byte layouts follow
the RowBinary spec: LEB128 string lengths, little-endian fixed-width numbers). That the quoted
literals and encoded rows are read back exactly by real servers is covered in
test_clickhouse_storage.py.
"""

from __future__ import annotations

import gzip
import struct

import pytest

from mlrun.server.protocols.clickhouse import (
    METRIC_COLUMNS,
    ClickHouseError,
    ColumnType,
    RowBinaryType,
    build_insert_request,
    build_query_request,
    deadline_settings,
    decode_json_each_row,
    decode_row_binary,
    decode_varint,
    encode_metric_rows,
    encode_rowbinary,
    encode_string,
    encode_varint,
    find_error_in_body,
    insert_prefix,
    insert_statement,
    parse_error,
    quote_identifier,
    quote_list,
    quote_string,
    quote_value,
    with_format,
)

# ---------------------------------------------------------------- quoting


@pytest.mark.parametrize(
    ("raw", "literal"),
    [
        ("plain", "'plain'"),
        ("", "''"),
        ("it's", r"'it\'s'"),
        ("back\\slash", r"'back\\slash'"),
        ("\\'", r"'\\\''"),  # a backslash before a quote must not un-escape the quote
        ("nul\0byte", r"'nul\0byte'"),
        ("line\nbreak\ttab\rcr", r"'line\nbreak\ttab\rcr'"),
        ("über 😀 ✓", "'über 😀 ✓'"),
        ("'; DROP TABLE metrics; --", r"'\'; DROP TABLE metrics; --'"),
    ],
)
def test_quote_string(raw: str, literal: str) -> None:
    assert quote_string(raw) == literal


def test_quote_identifier_escapes_backquote_and_backslash() -> None:
    assert quote_identifier("metrics") == "`metrics`"
    assert quote_identifier("we`ird") == r"`we\`ird`"
    assert quote_identifier("a\\b") == r"`a\\b`"
    with pytest.raises(ValueError, match="empty"):
        quote_identifier("")


def test_quote_value_per_type() -> None:
    assert quote_value(None) == "NULL"
    assert quote_value(True) == "1"
    assert quote_value(False) == "0"
    assert quote_value(-(2**63)) == "-9223372036854775808"
    assert quote_value(2**64 - 1) == "18446744073709551615"
    assert quote_value(0.1) == "0.1"
    assert quote_value(1e-300) == "1e-300"
    assert quote_value(float("nan")) == "nan"
    assert quote_value(float("inf")) == "inf"
    assert quote_value(float("-inf")) == "-inf"
    assert quote_value("x'y") == r"'x\'y'"
    with pytest.raises(TypeError):
        quote_value(b"bytes")  # type: ignore[arg-type]


def test_quote_list() -> None:
    assert quote_list([1, "a", None, 2.5]) == "(1, 'a', NULL, 2.5)"
    with pytest.raises(ValueError, match="empty"):
        quote_list([])


def test_with_format_replaces_trailing_semicolon() -> None:
    assert with_format("SELECT 1 ;\n", "JSONEachRow") == "SELECT 1 FORMAT JSONEachRow"


def test_insert_statement_quotes_names() -> None:
    prefix = insert_prefix("metrics", ["run_id", "step"])
    assert prefix == "INSERT INTO `metrics` (`run_id`, `step`)"
    assert insert_statement("t`x", ["a"]) == r"INSERT INTO `t\`x` (`a`) FORMAT RowBinary"
    with pytest.raises(ValueError):
        insert_statement("t", [])


# ---------------------------------------------------------------- requests


def test_query_request_sends_sql_as_body_and_database_as_parameter() -> None:
    request = build_query_request(
        "SELECT 'ü'", database="db1", settings={"max_execution_time": "5"}
    )
    assert request.body == "SELECT 'ü'".encode()
    assert request.params == (("database", "db1"), ("max_execution_time", "5"))
    assert request.headers == ()
    assert build_query_request("SELECT 1", database=None).params == ()


def test_insert_request_puts_statement_in_query_parameter() -> None:
    rows = b"\x01a" * 1000
    request = build_insert_request("metrics", ["run_id"], rows, database="db1")
    assert request.params[0] == ("query", "INSERT INTO `metrics` (`run_id`) FORMAT RowBinary")
    assert ("database", "db1") in request.params
    assert request.body == rows
    assert request.headers == ()


def test_insert_request_gzip_body_decompresses_to_the_rows() -> None:
    rows = b"\x05hello" * 1000
    request = build_insert_request("t", ["s"], rows, database=None, gzip_level=1)
    assert dict(request.headers) == {"Content-Encoding": "gzip"}
    assert len(request.body) < len(rows)
    assert gzip.decompress(request.body) == rows


def test_deadline_settings_round_up_to_whole_seconds() -> None:
    assert deadline_settings(0.2) == {"max_execution_time": "1"}
    assert deadline_settings(2.0) == {"max_execution_time": "2"}
    assert deadline_settings(2.01) == {"max_execution_time": "3"}


# ---------------------------------------------------------------- RowBinary


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (300, b"\xac\x02"),
        (16384, b"\x80\x80\x01"),
    ],
)
def test_encode_varint(value: int, encoded: bytes) -> None:
    assert encode_varint(value) == encoded


def test_encode_varint_refuses_negative() -> None:
    with pytest.raises(ValueError):
        encode_varint(-1)


def test_encode_string_is_utf8_byte_length_then_bytes() -> None:
    assert encode_string("") == b"\x00"
    assert encode_string("é") == b"\x02\xc3\xa9"
    long = "x" * 200
    assert encode_string(long) == b"\xc8\x01" + b"x" * 200


def test_encode_metric_rows_bytes_by_hand() -> None:
    rows = [("r", "m", 1, 0.5, 2, 3), ("run2", "é", -1, -2.0, 1_700_000_000_000, 2**64 - 1)]
    expected = (
        b"\x01r"
        + b"\x01m"
        + b"\x01\x00\x00\x00\x00\x00\x00\x00"  # step 1, Int64 LE
        + b"\x00\x00\x00\x00\x00\x00\xe0\x3f"  # 0.5 is 0x3FE0000000000000
        + b"\x02\x00\x00\x00\x00\x00\x00\x00"  # timestamp_ms 2
        + b"\x03\x00\x00\x00\x00\x00\x00\x00"  # version 3, UInt64 LE
        + b"\x04run2"
        + b"\x02\xc3\xa9"
        + b"\xff" * 8  # step -1
        + b"\x00\x00\x00\x00\x00\x00\x00\xc0"  # -2.0 is 0xC000000000000000
        + b"\x00\x68\xe5\xcf\x8b\x01\x00\x00"  # 1_700_000_000_000 = 0x018BCFE56800
        + b"\xff" * 8  # version 2**64 - 1
    )
    assert encode_metric_rows(rows) == expected
    assert encode_metric_rows([]) == b""


def test_encode_metric_rows_does_not_mix_cached_prefixes() -> None:
    rows = [("a", "x", 0, 0.0, 0, 0), ("b", "x", 0, 0.0, 0, 0), ("a", "y", 0, 0.0, 0, 0)]
    body = encode_metric_rows(rows)
    tail = b"\x00" * 32
    assert body == b"\x01a\x01x" + tail + b"\x01b\x01x" + tail + b"\x01a\x01y" + tail


@pytest.mark.parametrize(
    "bad_row",
    [
        ("r", "m", 2**63, 0.0, 0, 0),  # step beyond Int64
        ("r", "m", 0, 0.0, 0, -1),  # version below UInt64
        ("r", "m", 0, "0.5", 0, 0),  # value not a number
        ("r", None, 0, 0.0, 0, 0),  # name not a string
    ],
)
def test_encode_metric_rows_names_the_bad_row(bad_row: tuple[object, ...]) -> None:
    rows = [("r", "m", 0, 0.0, 0, 0), bad_row]
    with pytest.raises(ValueError, match="row 1"):
        encode_metric_rows(rows)  # type: ignore[arg-type]


def test_encode_rowbinary_matches_the_metric_fast_path() -> None:
    rows = [("r1", "loss", 7, 0.25, 1_700_000_000_123, 42), ("r2", "acc", -3, 1e308, 0, 2**63)]
    types: tuple[ColumnType, ...] = ("String", "String", "Int64", "Float64", "Int64", "UInt64")
    assert len(types) == len(METRIC_COLUMNS)
    assert encode_rowbinary(rows, types) == encode_metric_rows(rows)


def test_encode_rowbinary_mixed_columns_by_hand() -> None:
    rows = [(1, "ab", 255, -2, 7)]
    body = encode_rowbinary(rows, ("UInt32", "String", "UInt8", "Int32", "UInt64"))
    expected = (
        b"\x01\x00\x00\x00" + b"\x02ab" + b"\xff" + b"\xfe\xff\xff\xff" + b"\x07" + b"\x00" * 7
    )
    assert body == expected
    assert struct.calcsize("<IBiQ") + 3 == len(body)


def test_encode_rowbinary_rejects_bad_rows_and_types() -> None:
    with pytest.raises(ValueError, match="row 0 has 1 values"):
        encode_rowbinary([(1,)], ("Int64", "Int64"))
    with pytest.raises(ValueError, match="row 0"):
        encode_rowbinary([(256,)], ("UInt8",))
    with pytest.raises(ValueError, match="unsupported"):
        encode_rowbinary([(1,)], ("Decimal",))  # type: ignore[arg-type]


# ---------------------------------------------------------------- errors

# Captured from the Debian 18.16 server and from chdb 26.9.
_LEGACY_SYNTAX = (
    "Code: 62, e.displayText() = DB::Exception: Syntax error: failed at position 1: SELEC 1."
    " Expected one of: SELECT query, e.what() = DB::Exception\n"
)
_MODERN_SYNTAX = (
    "Code: 62. DB::Exception: Syntax error: failed at position 7 (1): 1. Expected one of:"
    " FROM, end of query. (SYNTAX_ERROR) (version 26.9.2.1)"
)


def test_parse_legacy_error_body() -> None:
    error = parse_error(_LEGACY_SYNTAX)
    assert error == ClickHouseError(
        code=62,
        message="Syntax error: failed at position 1: SELEC 1. Expected one of: SELECT query",
    )


def test_parse_modern_error_body() -> None:
    error = parse_error(_MODERN_SYNTAX)
    assert error.code == 62
    assert error.message.startswith("Syntax error: failed at position 7")
    assert error.message.endswith("(SYNTAX_ERROR) (version 26.9.2.1)")


def test_parse_error_finds_the_code_after_a_driver_prefix() -> None:
    text = (
        "Streaming insert finish failed: Code: 33. DB::Exception: Cannot read all data."
        " Bytes read: 2. Bytes expected: 5: (at row 1)\n: While executing BinaryRowInputFormat."
        " (CANNOT_READ_ALL_DATA) (version 26.9.2.1)"
    )
    error = parse_error(text)
    assert error.code == 33
    assert error.message.startswith("Cannot read all data.")


def test_parse_error_without_a_code() -> None:
    assert parse_error("Bad Gateway\n") == ClickHouseError(code=None, message="Bad Gateway")
    with_header = parse_error("something odd", code_header="241")
    assert with_header == ClickHouseError(code=241, message="something odd")


def test_header_code_wins_over_body_code() -> None:
    assert parse_error(_MODERN_SYNTAX, code_header="159").code == 159


def test_error_in_200_body_legacy_form() -> None:
    # What 18.16 sent for `SELECT throwIf(number = 300000) ... FORMAT JSONEachRow`.
    body = (
        b'{"throwIf(equals(number, 300000))":0}\n'
        * 3
        + b"Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is"
        b" non zero, e.what() = DB::Exception\n"
    )
    assert find_error_in_body(body) == ClickHouseError(
        code=395, message="Value passed to 'throwIf' function is non zero"
    )


def test_error_in_200_body_marker_form() -> None:
    # 25.1-25.10: an `__exception__` line, then the modern error line.
    body = (
        b'{"a":0}\n{"a":0}\n__exception__\nCode: 395. DB::Exception: There was an error in the'
        b" stream!: while executing 'FUNCTION throwIf'. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)"
        b" (version 25.1.6.34 (official build))\n"
    )
    error = find_error_in_body(body)
    assert error is not None
    assert error.code == 395
    assert error.message.startswith("There was an error in the stream!")


def test_error_in_200_body_tagged_form() -> None:
    # 25.11+: the message is framed by `__exception__<tag>` ... `<length> <tag>__exception__`.
    message = "Code: 241. DB::Exception: Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED)"
    body = (
        b'{"a":1}\n\r\n__exception__\r\nPU1FNUFH98\r\n'
        + message.encode()
        + f"\n{len(message)} PU1FNUFH98\r\n__exception__\r\n".encode()
    )
    assert find_error_in_body(body) == ClickHouseError(
        code=241, message="Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED)"
    )


def test_clean_200_bodies_have_no_error() -> None:
    assert find_error_in_body(b"") is None
    assert find_error_in_body(b'{"a":1}\n{"a":2}\n') is None
    # Error-looking text inside a JSON value is data: JSONEachRow lines start with `{`.
    tricky = b'{"note":"Code: 1, e.displayText() = DB::Exception: no"}\n'
    assert find_error_in_body(tricky) is None


# ---------------------------------------------------------------- results


def test_decode_json_each_row_keeps_64_bit_integers_exact() -> None:
    body = b'{"i":9223372036854775807,"u":18446744073709551615,"f":0.1,"s":"a\\u0000b"}\n{"i":-1}\n'
    rows = decode_json_each_row(body)
    assert rows == [
        {"i": 2**63 - 1, "u": 2**64 - 1, "f": 0.1, "s": "a\0b"},
        {"i": -1},
    ]
    assert isinstance(rows[0]["i"], int)
    assert decode_json_each_row(b"") == []
    assert decode_json_each_row(b"\n") == []
    with pytest.raises(ValueError, match="JSONEachRow"):
        decode_json_each_row(b"1\tfoo\n")


# ---------------------------------------------------------------- RowBinary results


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**63 - 1])
def test_decode_varint_reads_what_encode_varint_writes(value: int) -> None:
    encoded = b"x" + encode_varint(value) + b"y"
    assert decode_varint(encoded, 1) == (value, len(encoded) - 1)


def test_decode_row_binary_reads_strings_arrays_and_scalars() -> None:
    steps = [0, 1, 2**40, -5]
    values = [0.5, -1.0, float("inf"), 1e-300]
    row = (encode_string("run-\u00e9") + encode_varint(len(steps))
           + struct.pack("<4q", *steps) + encode_varint(len(values))
           + struct.pack("<4d", *values) + struct.pack("<q", -7) + struct.pack("<d", 2.5))
    empty = encode_string("") + encode_varint(0) + encode_varint(0) + struct.pack("<qd", 0, 0.0)
    rows = decode_row_binary(row + empty, ("String", "Array(Int64)", "Array(Float64)", "Int64",
                                           "Float64"))
    assert rows == [["run-\u00e9", steps, values, -7, 2.5], ["", [], [], 0, 0.0]]
    assert all(type(v) is int for v in rows[0][1]) and all(type(v) is float for v in rows[0][2])
    assert decode_row_binary(b"", ("String",)) == []


@pytest.mark.parametrize(("body", "types"), [
    # an array shorter than its length
    (encode_varint(3) + struct.pack("<2q", 1, 2), ("Array(Int64)",)),
    # a string shorter than its length
    (encode_varint(5) + b"abc", ("String",)),
    # a length whose varint never ends
    (b"\x80", ("String",)),
    # a row cut in its second column
    (encode_varint(1) + struct.pack("<q", 1) + encode_varint(1) + b"\x00" * 7,
     ("Array(Int64)", "Array(Float64)")),
    # a scalar cut short
    (b"\x00" * 5, ("Int64",)),
])
def test_decode_row_binary_refuses_truncated_bodies(body: bytes,
                                                    types: tuple[RowBinaryType, ...]) -> None:
    with pytest.raises(ValueError, match="truncated RowBinary"):
        decode_row_binary(body, types)
