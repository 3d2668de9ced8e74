"""Schema migrations: discovery of the numbered, forward-only SQL files.

Owns: finding `sql/<engine>/NNNN_name.sql`, splitting them into statements, and their order.
The engines' own appliers (ledger table, lock, execution) live with their storages
(`storage.postgres.client.apply_postgres_migrations`,
`storage.clickhouse.migrations.apply_clickhouse_migrations`).
Invariants: versions are unique and strictly increasing; a file, once released, never changes
(its checksum is recorded in the ledger and a changed file stops start-up).

Where the files are: in a source checkout, `<repo>/sql/`; in an installed wheel, the build
copies them to `mlrun/_sql/` (see pyproject.toml). Must not import storage or I/O libraries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Engine = Literal["postgres", "clickhouse"]

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]
    checksum: str


def sql_root() -> Path:
    """The directory holding `postgres/` and `clickhouse/` schema folders."""
    package_dir = Path(__file__).resolve().parents[2]  # mlrun/server/storage/ -> mlrun/
    installed = package_dir / "_sql"
    if installed.is_dir():
        return installed
    return package_dir.parent / "sql"


def split_statements(sql: str) -> tuple[str, ...]:
    """Split a schema file on `;` at line ends. Schema files keep one statement per `;`-ended
    block and put no `;` inside string literals, so no SQL parser is needed."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    statements = []
    for chunk in "\n".join(lines).split(";\n"):
        statement = chunk.strip().rstrip(";").strip()
        if statement:
            statements.append(statement)
    return tuple(statements)


def load_migrations(engine: Engine, root: Path | None = None) -> tuple[Migration, ...]:
    folder = (root or sql_root()) / engine
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise ValueError(f"schema file {path.name} is not named NNNN_name.sql")
        text = path.read_text(encoding="utf-8")
        migrations.append(
            Migration(
                version=int(match["version"]),
                name=match["name"],
                statements=split_statements(text + "\n"),
                checksum=hashlib.sha256(text.encode()).hexdigest(),
            )
        )
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate schema versions in {folder}")
    return tuple(migrations)
