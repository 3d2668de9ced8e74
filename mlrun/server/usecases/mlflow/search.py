"""MLflow's search grammar (runs/search and experiments/search): parsing, matching, ordering and
page tokens. Pure: no I/O.

Filter: comparisons joined by `AND` (MLflow has no `OR`), each `<entity>.<key> <op> <value>`:
- entities `metrics` (`metric`), `params` (`param`, `parameters`), `tags` (`tag`),
  `attributes` (`attribute`, `attr`, `run`); a bare name is an attribute; a key may be quoted
  with backticks or double quotes (`metrics."val loss"`, ``tags.`mlflow.runName` ``);
- operators `=`, `!=`, `<`, `<=`, `>`, `>=` (numbers for metrics and the time attributes,
  text for the rest), `LIKE` and `ILIKE` (`%` and `_` wildcards), `IN` / `NOT IN` over a
  parenthesised list of strings, `IS NULL` / `IS NOT NULL`;
- values are 'single' or "double" quoted strings or numbers.
A run without the named metric, param or tag never matches a comparison (only `IS NULL`).

order_by: `<entity>.<key> [ASC|DESC]`; values missing from a run sort last in either
direction; ties are broken by start time (newest first), then id, as MLflow does.

Every malformed filter or order_by is a 400 naming the field (`filter`, `order_by[i]`).
Must not import anything that does I/O.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from mlrun.server.errors import InvalidInput
from mlrun.wire.error_codes import ErrorCode

Entity = Literal["metrics", "params", "tags", "attributes"]
Value = str | float | tuple[str, ...] | None
T = TypeVar("T")

_ENTITY_ALIASES: dict[str, Entity] = {
    "metric": "metrics", "metrics": "metrics",
    "param": "params", "params": "params", "parameter": "params", "parameters": "params",
    "tag": "tags", "tags": "tags",
    "attribute": "attributes", "attributes": "attributes", "attr": "attributes",
    "run": "attributes",
}
_OPERATORS = ("=", "!=", "<", "<=", ">", ">=", "LIKE", "ILIKE", "IN", "NOT IN", "IS NULL",
              "IS NOT NULL")

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    | (?P<backtick>`[^`]*`)
    | (?P<op><=|>=|!=|<>|=|<|>)
    | (?P<number>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_]))
    | (?P<punct>[(),.])
    | (?P<word>[A-Za-z_][A-Za-z0-9_\-/:.]*)
    )""", re.VERBOSE)


@dataclass(frozen=True, slots=True)
class Comparison:
    entity: Entity
    key: str
    op: str
    value: Value


@dataclass(frozen=True, slots=True)
class OrderClause:
    entity: Entity
    key: str
    descending: bool


def _invalid(field: str, message: str) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", code=ErrorCode.INVALID_ARGUMENT, field=field)


def _tokens(text: str, field: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise _invalid(field, f"cannot parse the text at {text[position:position + 20]!r}")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        position = match.end()
    return tokens


def _unquote(token: str) -> str:
    body = token[1:-1]
    return re.sub(r"\\(.)", r"\1", body)


class _Parser:
    def __init__(self, text: str, field: str) -> None:
        self.field = field
        self.tokens = _tokens(text, field)
        self.index = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise _invalid(self.field, "ends too early")
        self.index += 1
        return token

    def keyword(self, *words: str) -> bool:
        token = self.peek()
        if token is not None and token[0] == "word" and token[1].upper() in words:
            self.index += 1
            return True
        return False

    def identifier(self) -> tuple[Entity, str]:
        kind, text = self.take()
        if kind in ("backtick", "string"):
            return "attributes", _unquote(text)
        if kind != "word":
            raise _invalid(self.field, f"expected a name, got {text!r}")
        head, dot, rest = text.partition(".")
        entity_word = head if dot or self._next_is_dot() else None
        if entity_word is None:
            return "attributes", text
        entity = _ENTITY_ALIASES.get(entity_word.lower())
        if entity is None:
            raise _invalid(self.field, f"unknown entity {entity_word!r} (use metrics, params,"
                                       " tags or attributes)")
        if dot and rest:
            return entity, rest
        if not dot:
            self.take()  # the "."
        kind, key = self.take()
        if kind in ("backtick", "string"):
            return entity, _unquote(key)
        if kind == "word":
            return entity, key
        raise _invalid(self.field, f"expected a key after {entity_word}., got {key!r}")

    def _next_is_dot(self) -> bool:
        token = self.peek()
        return token is not None and token == ("punct", ".")

    def operator(self) -> str:
        kind, text = self.take()
        if kind == "op":
            return "!=" if text == "<>" else text
        upper = text.upper() if kind == "word" else ""
        if upper in ("LIKE", "ILIKE", "IN"):
            return upper
        if upper == "NOT" and self.keyword("IN"):
            return "NOT IN"
        if upper == "IS":
            negated = self.keyword("NOT")
            if not self.keyword("NULL"):
                raise _invalid(self.field, "expected NULL after IS")
            return "IS NOT NULL" if negated else "IS NULL"
        raise _invalid(self.field, f"expected a comparison operator, got {text!r}")

    def value(self, op: str) -> Value:
        if op in ("IS NULL", "IS NOT NULL"):
            return None
        if op in ("IN", "NOT IN"):
            if self.take() != ("punct", "("):
                raise _invalid(self.field, f"{op} needs a parenthesised list of strings")
            items: list[str] = []
            while True:
                kind, text = self.take()
                if kind != "string":
                    raise _invalid(self.field, f"{op} lists strings only, got {text!r}")
                items.append(_unquote(text))
                kind, text = self.take()
                if (kind, text) == ("punct", ")"):
                    return tuple(items)
                if (kind, text) != ("punct", ","):
                    raise _invalid(self.field, f"expected ',' or ')' in the {op} list")
        kind, text = self.take()
        if kind == "string":
            return _unquote(text)
        if kind == "number":
            return float(text)
        raise _invalid(self.field, f"expected a quoted string or a number, got {text!r}")


def parse_filter(text: str | None, *, field: str = "filter") -> list[Comparison]:
    if text is None or not text.strip():
        return []
    parser = _Parser(text, field)
    comparisons: list[Comparison] = []
    while True:
        entity, key = parser.identifier()
        op = parser.operator()
        value = parser.value(op)
        _check_types(entity, key, op, value, field)
        comparisons.append(Comparison(entity, key, op, value))
        if parser.peek() is None:
            return comparisons
        if not parser.keyword("AND"):
            raise _invalid(field, f"expected AND, got {parser.take()[1]!r} (OR is not supported)")


NUMERIC_ATTRIBUTES = frozenset({"start_time", "end_time", "creation_time", "last_update_time"})


def _check_types(entity: Entity, key: str, op: str, value: Value, field: str) -> None:
    numeric = entity == "metrics" or (entity == "attributes" and key in NUMERIC_ATTRIBUTES)
    if op in ("IS NULL", "IS NOT NULL"):
        return
    if numeric:
        if op not in ("=", "!=", "<", "<=", ">", ">=") or not isinstance(value, float):
            raise _invalid(field, f"{entity}.{key} compares with =, !=, <, <=, >, >= and a"
                                  " number")
    elif op in ("<", "<=", ">", ">=") or isinstance(value, float):
        raise _invalid(field, f"{entity}.{key} compares as text: use =, !=, LIKE, ILIKE, IN or"
                              " NOT IN and a quoted string")


def _like(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    regex = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
    return re.compile(f"^{regex}$", 0 if case_sensitive else re.IGNORECASE | re.DOTALL)


Lookup = Callable[[Entity, str], str | float | None]


def matches(comparisons: Sequence[Comparison], lookup: Lookup) -> bool:
    for c in comparisons:
        actual = lookup(c.entity, c.key)
        if c.op == "IS NULL":
            if actual is not None:
                return False
            continue
        if c.op == "IS NOT NULL":
            if actual is None:
                return False
            continue
        if actual is None or not _compare(actual, c.op, c.value):
            return False
    return True


def _compare(actual: str | float, op: str, expected: Value) -> bool:
    if isinstance(expected, tuple):
        return (actual in expected) == (op == "IN")
    if op in ("LIKE", "ILIKE"):
        return bool(_like(str(expected), op == "LIKE").match(str(actual)))
    if isinstance(expected, float):
        if isinstance(actual, str):
            return False
        left, right = float(actual), expected
        return {"=": left == right, "!=": left != right, "<": left < right,
                "<=": left <= right, ">": left > right, ">=": left >= right}[op]
    text = str(actual)
    return text == expected if op == "=" else text != expected


def parse_order_by(clauses: Sequence[str]) -> list[OrderClause]:
    parsed: list[OrderClause] = []
    for index, clause in enumerate(clauses):
        field = f"order_by[{index}]"
        parser = _Parser(clause, field)
        entity, key = parser.identifier()
        descending = False
        if parser.keyword("DESC"):
            descending = True
        else:
            parser.keyword("ASC")
        if parser.peek() is not None:
            raise _invalid(field, f"unexpected {parser.take()[1]!r} after the direction")
        parsed.append(OrderClause(entity, key, descending))
    return parsed


def ordered(items: Sequence[T], clauses: Sequence[OrderClause],
               value_of: Callable[[T, OrderClause], str | float | None],
               tiebreak: Callable[[T], tuple[float, str]]) -> list[T]:
    """`items` sorted by `clauses` (missing values last), then by `tiebreak`."""
    result = sorted(items, key=tiebreak)
    for clause in reversed(clauses):
        present = [(value_of(item, clause), item) for item in result]
        have = [(v, item) for v, item in present if v is not None]
        missing = [item for v, item in present if v is None]
        have.sort(key=lambda pair: _sort_key(pair[0]), reverse=clause.descending)
        result = [item for _, item in have] + missing
    return result


def _sort_key(value: str | float | None) -> tuple[int, float, str]:
    if isinstance(value, str):
        return (1, 0.0, value)
    return (0, float(value or 0.0), "")


def encode_page_token(offset: int, query: str) -> str:
    raw = json.dumps({"offset": offset, "query": query}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def decode_page_token(token: str | None, query: str) -> int:
    """The offset a token encodes; 400 for a token of another query or a malformed one."""
    if not token:
        return 0
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        offset = decoded["offset"]
        same = decoded["query"] == query
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _invalid("page_token", "is not a token this server issued") from None
    if not isinstance(offset, int) or offset < 0 or not same:
        raise _invalid("page_token", "belongs to another search")
    return offset


def run_lookup(*, metrics: Mapping[str, float], params: Mapping[str, str],
               tags: Mapping[str, str], attributes: Mapping[str, str | float | None]) -> Lookup:
    def lookup(entity: Entity, key: str) -> str | float | None:
        if entity == "metrics":
            return metrics.get(key)
        if entity == "params":
            return params.get(key)
        if entity == "tags":
            return tags.get(key)
        return attributes.get(key)

    return lookup
