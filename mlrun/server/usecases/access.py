"""Run access: may this caller touch this run?

Owns `RunAccess`, the project check for calls that address a run by id (ingest, artifacts,
reads): a project-scoped key may only touch runs of its project, and gets 404 `run_not_found`
for another project's run exactly as for a missing one, so a scoped key learns nothing about
other projects' runs. The rule itself is `Principal.require_run_visible` (`ports.keys`); who the
caller is comes from `usecases.auth.Authenticator`.

Must not import the HTTP or gRPC edges or storage: the run's project is looked up through the
callable it is given (`run_project` of the `RunMetadata` or `ArtifactRows` port).

Invariants: runs never change project, so a cached answer never goes stale; the cache is
bounded (LRU, `RUN_PROJECT_CACHE_ENTRIES`); unscoped keys never cause a lookup.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from mlrun.server.ports.keys import Principal

RUN_PROJECT_CACHE_ENTRIES = 50_000


class RunAccess:
    """The project check for calls addressing a run by id: a project-scoped key may only touch
    runs of its project. Runs never change project, so run -> project answers are cached (LRU,
    bounded) and the check costs a database round trip only the first time a run is seen."""

    def __init__(
        self,
        run_project: Callable[[str], Awaitable[str]],
        *,
        max_entries: int = RUN_PROJECT_CACHE_ENTRIES,
    ) -> None:
        self._run_project = run_project
        self._max_entries = max_entries
        self._cache: OrderedDict[str, str] = OrderedDict()

    async def require(self, principal: Principal, run_id: str) -> None:
        """404 `run_not_found` for an unknown run and for a run of another project (only
        looked up for project-scoped keys)."""
        if principal.project is None:
            return
        project = self._cache.get(run_id)
        if project is None:
            project = await self._run_project(run_id)
            self._cache[run_id] = project
            if len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(run_id)
        principal.require_run_visible(run_id, project)
