"""The import contracts in pyproject.toml ([tool.importlinter], checked by `lint-imports` in
scripts/test.sh) cover the whole server, so a new module cannot slip past them:

- the contract that keeps protocols, domain and wire apart forbids every part of `mlrun.server`
  but the error tree (import-linter has no "all but", so the parts are listed; this test fails
  when a new folder or module under mlrun/server/ is missing from that list);
- every folder of `mlrun.server` is a layer or one of those independent folders;
- `import mlrun` (the SDK's public face) reaches no server module, directly or through others
  (the SDK contract covers `mlrun.sdk.*`; the root module is not in it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import grimp

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "mlrun" / "server"
INDEPENDENT = "Protocols, domain and wire depend on nothing else of the server but the error tree"
ALLOWED_TO_ALL = {"mlrun.server.errors"}


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    found: list[dict[str, Any]] = config["tool"]["importlinter"]["contracts"]
    return found


def contract(name: str) -> dict[str, Any]:
    [found] = [c for c in contracts() if c["name"] == name]
    return found


def server_parts() -> set[str]:
    """`mlrun.server.X` for every folder and module directly under mlrun/server/."""
    parts = {f"mlrun.server.{p.name}" for p in SERVER.iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {f"mlrun.server.{p.stem}" for p in SERVER.glob("*.py") if p.stem != "__init__"}
    return parts


def test_protocols_domain_and_wire_are_forbidden_every_other_part_of_the_server() -> None:
    independent = contract(INDEPENDENT)
    own = {m for m in independent["source_modules"] if m.startswith("mlrun.server.")}
    expected = server_parts() - ALLOWED_TO_ALL - own
    assert set(independent["forbidden_modules"]) == expected, (
        "list every part of mlrun.server in the forbidden_modules of the contract "
        f"{INDEPENDENT!r} (or allow it here, with a reason)")


def test_every_server_folder_is_a_layer_or_independent() -> None:
    [layers] = [c for c in contracts() if c["type"] == "layers"]
    placed = set(layers["layers"]) | set(contract(INDEPENDENT)["source_modules"])
    folders = {f"mlrun.server.{p.name}" for p in SERVER.iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders <= placed, f"not in any layer: {sorted(folders - placed)}"


def test_import_mlrun_reaches_no_server_module() -> None:
    graph = grimp.build_graph("mlrun")
    reached = graph.find_upstream_modules("mlrun", as_package=False)
    assert not {m for m in reached if m.startswith("mlrun.server")}
