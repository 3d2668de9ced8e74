"""The machine-readable codes have one registry (`mlrun.wire.error_codes`), and nothing else:

- no code in `mlrun/` is written as a string literal (every `code=`, `default_code`, and
  trailer code is a registry member), so a code the registry does not define cannot be sent
  (mypy holds the error tree to it as well: its `code` parameters are typed `ErrorCode`);
- the README's "Error codes" table is exactly the registry's, both ways;
- the OpenAPI document lists the registry as the enum of an error's `code`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from mlrun.server.edges.http.app import Router
from mlrun.server.edges.http.openapi import add_openapi_route, build_openapi
from mlrun.wire.error_codes import CATALOGUE, ErrorCode, markdown_table

ROOT = Path(__file__).resolve().parents[1]


def _assigned_names(node: ast.Assign | ast.AnnAssign) -> set[str]:
    """`x = ...` and `x: T = ...` alike (a class attribute is often annotated)."""
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {target.id for target in targets if isinstance(target, ast.Name)}


def literal_codes(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every code written as a string literal."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code" \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            found.append((node.value.lineno, node.value.value))
        elif isinstance(node, ast.Assign | ast.AnnAssign) \
                and "default_code" in _assigned_names(node) \
                and isinstance(node.value, ast.Constant):
            found.append((node.lineno, str(node.value.value)))
        elif isinstance(node, ast.Tuple) and len(node.elts) == 2 \
                and isinstance(node.elts[0], ast.Constant) \
                and node.elts[0].value == "mlrun-error-code" \
                and isinstance(node.elts[1], ast.Constant):
            found.append((node.lineno, str(node.elts[1].value)))
    return found


def test_no_code_is_a_free_string_literal() -> None:
    offenders = []
    for path in sorted((ROOT / "mlrun").rglob("*.py")):
        if "proto" in path.parts:
            continue
        for line, text in literal_codes(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {text!r}")
    assert not offenders, "use mlrun.wire.error_codes.ErrorCode:\n" + "\n".join(offenders)


def test_the_scan_catches_a_literal() -> None:
    """The check above can fail: a literal in any of the four shapes is found."""
    source = ('raise NotFound("x", code="nope")\n'
              'class E:\n    default_code = "nope"\n'
              'class F:\n    default_code: ClassVar[str] = "nope"\n'
              'trailer = ("mlrun-error-code", "nope")\n')
    assert [text for _, text in literal_codes(ast.parse(source))] == ["nope"] * 4


def test_every_code_is_catalogued_once() -> None:
    assert list(CATALOGUE) == list(ErrorCode)


def readme_error_table() -> str:
    """The README's table that starts with the registry's header row, up to its last row."""
    lines = (ROOT / "README.md").read_text().splitlines()
    header = markdown_table().splitlines()[0]
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


def test_the_readme_table_is_the_registry() -> None:
    """Both ways: no code missing from the README, no row there that the registry lacks."""
    assert readme_error_table() == markdown_table(), (
        "regenerate it: python -m mlrun.wire.error_codes")


def test_openapi_lists_the_codes_as_the_error_code_enum() -> None:
    router = Router()
    add_openapi_route(router)
    document = build_openapi(router.routes, title="t", version="1")
    schemas = document["components"]["schemas"]
    enum = schemas["ErrorDetail"]["properties"]["code"]["enum"]
    assert enum == [code.value for code in ErrorCode]
