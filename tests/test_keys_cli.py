"""`mlrun keys create | list | revoke` (`mlrun.keys_command.keys_main`) against a running
`mlrun serve` on real backends, and its argument parsing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mlrun.__main__ import main as mlrun_main
from mlrun.keys_command import UsageError, keys_main, parse_duration_s, parse_scopes

from server_process import TEST_API_KEY, ServerProcess, clean_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(server_env: dict[str, str], tmp_path: Path,
           servers: list[ServerProcess]) -> Iterator[ServerProcess]:
    with clean_server(server_env, tmp_path / "server.log", servers) as process:
        yield process


def test_durations_and_scopes() -> None:
    assert [parse_duration_s(t) for t in ("90", "90s", "15m", "12h", "30d", "2w")] == [
        90, 90, 900, 43_200, 2_592_000, 1_209_600]
    for bad in ("0", "-5", "1y", "soon", ""):
        with pytest.raises(UsageError):
            parse_duration_s(bad)
    assert parse_scopes(["read,write", "write", "ADMIN"]) == ["read", "write", "admin"]
    for bad_scopes in ([], ["root"], ["read,"]):
        with pytest.raises(UsageError):
            parse_scopes(bad_scopes)


def test_create_list_revoke_against_a_live_server(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("MLRUN_SERVER_URL", server.base_url)
    monkeypatch.setenv("MLRUN_API_KEY", TEST_API_KEY)

    httpx.post(f"{server.base_url}/api/v1/projects", json={"name": "vision"}, timeout=10,
               headers={"Authorization": f"Bearer {TEST_API_KEY}"})  # a key's project must exist
    assert keys_main(["create", "--name", "ci runner", "--scope", "read,write",
                      "--project", "vision", "--expires-in", "30d"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("mlrun_") and "\n" not in key
    assert "cannot be shown again" in err and key not in err
    created_id = err.split()[1]

    # The new key works, with what it was given.
    with httpx.Client(base_url=server.base_url, timeout=10,
                      headers={"X-API-Key": key}) as http:
        assert http.get("/api/v1/projects").status_code == 200
        assert http.get("/api/v1/keys").status_code == 403

    assert keys_main(["list"]) == 0
    out, _ = capsys.readouterr()
    header, row = out.splitlines()
    assert header.split()[:4] == ["KEY_ID", "NAME", "PREFIX", "SCOPES"]
    assert created_id in row and "read,write" in row and "vision" in row and "active" in row
    assert key not in out

    assert keys_main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["key_id"] for k in listed] == [created_id]
    assert listed[0]["expires_at"] is not None

    assert keys_main(["revoke", created_id]) == 0
    assert "revoked" in capsys.readouterr().err
    with httpx.Client(base_url=server.base_url, timeout=10,
                      headers={"X-API-Key": key}) as http:
        assert http.get("/api/v1/projects").status_code == 401

    # The admin key can also come from a file; --json prints the whole answer once.
    key_file = tmp_path / "admin.key"
    key_file.write_text(TEST_API_KEY + "\n")
    monkeypatch.delenv("MLRUN_API_KEY")
    assert keys_main(["--api-key-file", str(key_file), "create", "--name", "n",
                      "--scope", "admin", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["scopes"] == ["admin"] and created["key"].startswith("mlrun_")

    # Failures: exit 1 with the server's code, or 2 for bad usage; never a traceback.
    monkeypatch.setenv("MLRUN_API_KEY", key)  # revoked
    assert keys_main(["list"]) == 1
    err = capsys.readouterr().err
    assert "401 invalid_credentials" in err and key not in err
    monkeypatch.setenv("MLRUN_API_KEY", TEST_API_KEY)
    assert keys_main(["revoke", "key_nope"]) == 1
    assert "404 key_not_found" in capsys.readouterr().err
    assert keys_main(["create", "--name", "x"]) == 2  # no scope
    assert "--scope" in capsys.readouterr().err
    assert keys_main(["create", "--scope", "read"]) == 2  # argparse: --name is required
    capsys.readouterr()
    monkeypatch.delenv("MLRUN_API_KEY")
    monkeypatch.setenv("MLRUN_DATA_DIR", str(tmp_path / "no-data-dir"))
    assert keys_main(["list"]) == 2
    assert "MLRUN_API_KEY" in capsys.readouterr().err

    # Options where users type them: after the sub-command too.
    assert keys_main(["list", "--api-key-file", str(key_file), "--server", server.base_url]) == 0
    assert "KEY_ID" in capsys.readouterr().out
    # The exact line, through the `mlrun` entry point (it used to exit 2).
    assert mlrun_main(["keys", "create", "--name", "after", "--scope", "read",
                       "--api-key-file", str(key_file)]) == 0
    assert capsys.readouterr().out.strip().startswith("mlrun_")
    # With no key given, the bootstrap key of the server's data dir is found by itself.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "bootstrap-api-key").write_text(TEST_API_KEY + "\n")
    monkeypatch.setenv("MLRUN_DATA_DIR", str(data_dir))
    assert keys_main(["list"]) == 0
    assert "KEY_ID" in capsys.readouterr().out
    monkeypatch.setenv("MLRUN_API_KEY", TEST_API_KEY)
    assert keys_main(["--server", "http://127.0.0.1:9", "list"]) == 1
    assert "cannot reach" in capsys.readouterr().err
