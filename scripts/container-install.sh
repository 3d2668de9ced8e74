#!/bin/sh
# Install MLRun into a fresh virtualenv at PREFIX: the one install step of the Containerfile,
# also replayed outside a container by tests/test_container_recipe.py (no image can be built on
# machines without a container engine, so the recipe itself is what gets tested).
#
#   sh scripts/container-install.sh PREFIX [SOURCE_DIR]
set -eu
prefix="$1"
source_dir="${2:-.}"
# The image build sets MLRUN_INSTALL_NO_CACHE=1 (no pip cache in a layer); a replay reuses it.
cache_flag=""
[ "${MLRUN_INSTALL_NO_CACHE:-0}" = "1" ] && cache_flag="--no-cache-dir"
python3 -m venv "$prefix"
"$prefix/bin/pip" install $cache_flag --disable-pip-version-check "$source_dir[embedded]"
# A wheel, not an editable install: the schemas travel inside the package (mlrun/_sql).
"$prefix/bin/python" -c "import mlrun.server.storage.migrations as m; assert (m.sql_root() / 'postgres').is_dir(), m.sql_root()"
