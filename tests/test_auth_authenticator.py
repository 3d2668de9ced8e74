"""The authenticator's rules without any I/O: key extraction, scopes, projects, expiry, the
staleness guard, local changes versus reloads, last-used throttling, the run -> project cache,
and the refresh task's behaviour when its directory fails (a fault a real PostgreSQL cannot be
made to produce on cue, hence the one fake here). Clocks are injected, never slept on."""

from __future__ import annotations

from collections.abc import Mapping

import anyio
import pytest

from mlrun.server.errors import (
    BackendUnavailable,
    MlrunError,
    NotFound,
    PermissionDenied,
)
from mlrun.server.ports.keys import NewKeyRecord, Principal, StoredKey, UsableKey
from mlrun.server.usecases.access import RunAccess
from mlrun.server.usecases.auth import (
    KEY_PREFIX,
    LAST_USED_RESOLUTION_S,
    MAX_STALENESS_S,
    Authenticator,
    display_prefix,
    key_digest,
    new_api_key,
)
from mlrun.server.usecases.keys import serve_key_refresh
from mlrun.wire.keys import KeyInfo

BOOTSTRAP = "mlrun_bootstrap-for-unit-tests-0123456789abcdef"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def usable(raw: str, key_id: str, scopes: set[str], project: str | None = None,
           expires_at_s: float | None = None) -> UsableKey:
    return UsableKey(key_digest(raw), Principal(key_id, frozenset(scopes), project), expires_at_s)


def make(clock: Clock | None = None, wall: Clock | None = None) -> Authenticator:
    return Authenticator(bootstrap_key=BOOTSTRAP, disabled=False,
                         monotonic=clock or Clock(), wall_clock=wall or Clock(1_700_000_000))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def code_of(auth: Authenticator, headers: Mapping[str, str]) -> str:
    with pytest.raises(MlrunError) as raised:
        auth.authenticate(headers)
    return raised.value.code


def test_key_format() -> None:
    key = new_api_key()
    assert key.startswith(KEY_PREFIX) and len(key) == len(KEY_PREFIX) + 43
    assert new_api_key() != key
    assert display_prefix(key) == key[:12] and len(key_digest(key)) == 32


def test_bootstrap_missing_malformed_unknown() -> None:
    auth = make()
    assert auth.authenticate(bearer(BOOTSTRAP)).has("write")
    assert auth.authenticate({"x-api-key": BOOTSTRAP}).key_id == "bootstrap"
    assert code_of(auth, {}) == "missing_credentials"
    assert code_of(auth, {"authorization": f"Basic {BOOTSTRAP}"}) == "malformed_credentials"
    assert code_of(auth, bearer("mlrun_nope")) == "invalid_credentials"
    assert code_of(auth, bearer("x" * 10_000)) == "invalid_credentials"
    disabled = Authenticator(bootstrap_key=None, disabled=True)
    assert disabled.authenticate({}).has("admin")


def test_scopes_projects_and_expiry() -> None:
    wall = Clock(1_700_000_000)
    auth = make(wall=wall)
    auth.replace_keys([
        usable("mlrun_r", "r", {"read"}),
        usable("mlrun_a", "a", {"write"}, project="proj-a", expires_at_s=wall.now + 10),
    ], loaded_from=auth.load_started())
    reader = auth.authenticate(bearer("mlrun_r"))
    reader.require("read")
    with pytest.raises(PermissionDenied, match="write"):
        reader.require("write")
    reader.require_project("anything")  # a global key
    scoped = auth.authenticate({"x-api-key": "mlrun_a"})
    scoped.require_project("proj-a")
    with pytest.raises(PermissionDenied) as raised:
        scoped.require_project("proj-b")
    assert raised.value.code == "wrong_project"
    with pytest.raises(PermissionDenied):
        scoped.require("read")  # write does not imply read; only admin implies the rest
    assert Principal("x", frozenset({"admin"})).has("read")
    wall.now += 10
    assert code_of(auth, bearer("mlrun_a")) == "key_expired"


def test_a_stale_view_refuses_database_keys_but_not_the_bootstrap_key() -> None:
    clock = Clock()
    auth = make(clock)
    auth.attach_directory()  # nothing loaded yet
    with pytest.raises(BackendUnavailable):
        auth.authenticate(bearer("mlrun_r"))
    auth.replace_keys([usable("mlrun_r", "r", {"read"})], loaded_from=auth.load_started())
    assert auth.authenticate(bearer("mlrun_r")).key_id == "r"
    clock.now += MAX_STALENESS_S + 1
    for key in ("mlrun_r", "mlrun_unknown"):
        assert code_of(auth, bearer(key)) == "keys_unavailable"
    assert auth.authenticate(bearer(BOOTSTRAP)).key_id == "bootstrap"
    auth.replace_keys([usable("mlrun_r", "r", {"read"})], loaded_from=auth.load_started())
    assert auth.authenticate(bearer("mlrun_r")).key_id == "r"
    assert auth.statistics().keys == 1


def test_local_changes_win_over_reloads_that_may_predate_them() -> None:
    clock = Clock()
    auth = make(clock)
    old = usable("mlrun_old", "old", {"read"})
    auth.replace_keys([old], loaded_from=auth.load_started())
    early = auth.load_started()  # a reload begins, then both changes commit here
    clock.now += 0.5
    new = usable("mlrun_new", "new", {"read"})
    auth.add_key(new)
    auth.remove_key("old")
    auth.replace_keys([old], loaded_from=early)  # its snapshot predates both changes
    assert code_of(auth, bearer("mlrun_old")) == "invalid_credentials"
    assert auth.authenticate(bearer("mlrun_new")).key_id == "new"
    clock.now += 0.5
    auth.replace_keys([new], loaded_from=auth.load_started())  # began after: the truth
    assert code_of(auth, bearer("mlrun_old")) == "invalid_credentials"
    assert auth.authenticate(bearer("mlrun_new")).key_id == "new"


def test_a_key_created_here_and_revoked_elsewhere_is_refused_at_the_next_reload() -> None:
    """The local creation protects the key only from reloads that may predate it, never from
    another process's revocation that a later reload shows."""
    clock = Clock()
    auth = make(clock)
    auth.replace_keys([], loaded_from=auth.load_started())
    created = usable("mlrun_new", "new", {"read"})
    auth.add_key(created)
    assert auth.authenticate(bearer("mlrun_new")).key_id == "new"
    clock.now += 0.1  # revoked on another server now; the next reload begins after that
    auth.replace_keys([], loaded_from=auth.load_started())
    assert code_of(auth, bearer("mlrun_new")) == "invalid_credentials"


def test_last_used_is_noted_at_most_once_per_resolution() -> None:
    clock, wall = Clock(), Clock(1_700_000_000)
    auth = make(clock, wall)
    auth.replace_keys([usable("mlrun_r", "r", {"read"})], loaded_from=auth.load_started())
    for _ in range(100):
        auth.authenticate(bearer("mlrun_r"))
    assert auth.take_last_used() == {"r": wall.now}
    auth.authenticate(bearer("mlrun_r"))
    assert auth.take_last_used() == {}
    clock.now += LAST_USED_RESOLUTION_S
    wall.now += LAST_USED_RESOLUTION_S
    # Reloads happened meanwhile.
    auth.replace_keys([usable("mlrun_r", "r", {"read"})], loaded_from=auth.load_started())
    auth.authenticate(bearer("mlrun_r"))
    pending = auth.take_last_used()
    assert pending == {"r": wall.now}
    auth.restore_last_used(pending)  # a failed write puts them back
    assert auth.take_last_used() == pending


async def test_run_access_caches_run_projects() -> None:
    lookups: list[str] = []

    async def run_project(run_id: str) -> str:
        lookups.append(run_id)
        if run_id == "missing":
            raise NotFound("no run", code="run_not_found")
        return "proj-a" if run_id.startswith("a") else "proj-b"

    access = RunAccess(run_project, max_entries=2)
    scoped = Principal("k", frozenset({"write"}), "proj-a")
    await access.require(Principal("g", frozenset({"write"})), "b1")  # global: no lookup
    assert lookups == []
    await access.require(scoped, "a1")
    await access.require(scoped, "a1")
    assert lookups == ["a1"]
    # Another project's run and a missing run answer alike: no existence oracle.
    with pytest.raises(NotFound) as other_project:
        await access.require(scoped, "b1")
    with pytest.raises(NotFound) as missing:
        await access.require(scoped, "missing")
    assert other_project.value.code == missing.value.code == "run_not_found"
    await access.require(scoped, "a2")
    await access.require(scoped, "a1")  # evicted by the bound of 2 entries: looked up again
    assert lookups == ["a1", "b1", "missing", "a2", "a1"]


class FlakyDirectory:
    """A key directory that fails on cue (PostgreSQL down), for the refresh task."""

    def __init__(self) -> None:
        self.keys: list[UsableKey] = []
        self.failing = False
        self.loads = 0
        self.loaded = anyio.Event()
        self.recorded: dict[str, float] = {}

    async def load_usable(self) -> list[UsableKey]:
        self.loads += 1
        self.loaded.set()
        if self.failing:
            raise BackendUnavailable("down", backend="postgres")
        return list(self.keys)

    async def record_last_used(self, used: Mapping[str, float]) -> None:
        if self.failing:
            raise BackendUnavailable("down", backend="postgres")
        self.recorded.update(used)

    async def insert(self, record: NewKeyRecord, *, max_usable: int) -> StoredKey:
        raise NotImplementedError

    async def list_keys(self, *, project: str | None) -> list[KeyInfo]:
        raise NotImplementedError

    async def revoke(self, key_id: str, *, project: str | None) -> KeyInfo:
        raise NotImplementedError


async def test_refresh_task_reloads_survives_failures_and_flushes_on_exit() -> None:
    directory = FlakyDirectory()
    directory.keys = [usable("mlrun_r", "r", {"read"})]
    auth = Authenticator(bootstrap_key=None, disabled=False)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: serve_key_refresh(
                auth, directory, interval_s=0.01, task_status=task_status))
            assert auth.authenticate(bearer("mlrun_r")).key_id == "r"  # loaded before start
            directory.failing = True
            for _ in range(3):  # failing reloads keep the last good view
                directory.loaded = anyio.Event()
                await directory.loaded.wait()
            assert auth.authenticate(bearer("mlrun_r")).key_id == "r"
            directory.keys = []
            directory.failing = False
            for _ in range(2):  # the second load starts only after the first was installed
                directory.loaded = anyio.Event()
                await directory.loaded.wait()
            assert code_of(auth, bearer("mlrun_r")) == "invalid_credentials"
            auth.replace_keys([usable("mlrun_w", "w", {"write"})],
                              loaded_from=auth.load_started())
            auth.authenticate(bearer("mlrun_w"))
            tg.cancel_scope.cancel()
    assert "w" in directory.recorded  # written on the way out, or by a reload before it
