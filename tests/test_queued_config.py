"""Configuration of queued ingest: REDIS_URL's forms and refusals, the queue's settings, the
combinations queued mode needs, and `mlrun process` refused outside it (exit 2, one line)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlrun.server.errors import ConfigError
from mlrun.server.runtime.config import (
    QueueConfig,
    RedisConfig,
    Secret,
    check_processor_config,
    load_config,
)

from server_process import ServerProcess

SERVERS = {"DATABASE_URL": "postgresql://u:pw@db:5432/mlrun", "CLICKHOUSE_HOST": "ch"}


def queued(**env: str) -> dict[str, str]:
    return {"INGEST_MODE": "queued", **SERVERS, **env}


@pytest.mark.parametrize(("url", "expected"), [
    ("redis://r:6380", RedisConfig(host="r", port=6380)),
    ("redis://r", RedisConfig(host="r")),
    ("redis://r:6379/3", RedisConfig(host="r", db=3)),
    ("redis://:p%40ss@r:1/", RedisConfig(host="r", port=1, password=Secret("p@ss"))),
    ("redis://me:pw@10.0.0.1:7000/2",
     RedisConfig(host="10.0.0.1", port=7000, username="me", password=Secret("pw"), db=2)),
    ("redis://[::1]:6379", RedisConfig(host="::1")),
])
def test_redis_url_forms(url: str, expected: RedisConfig) -> None:
    assert load_config(queued(REDIS_URL=url)).queue.redis == expected


@pytest.mark.parametrize(("url", "words"), [
    ("rediss://r:6379", "TLS"),
    ("http://r:6379", "scheme 'http'"),
    ("r:6379", "expected redis://"),
    ("redis://r:port", "bad port"),
    ("redis://r:6379/zero", "database"),
    ("redis://r:6379?db=1", "query"),
    ("redis://me@r:6379", "user name needs a password"),
    ("redis://:secretpw@", "no host"),
])
def test_malformed_redis_urls_are_refused_naming_the_variable(url: str, words: str) -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL: ") as refused:
        load_config(queued(REDIS_URL=url))
    message = str(refused.value)
    assert words in message and "\n" not in message and "secretpw" not in message


def test_queue_settings_and_their_defaults() -> None:
    config = load_config(queued(REDIS_URL="redis://r"))
    assert config.ingest.mode == "queued"
    assert config.queue == QueueConfig(redis=RedisConfig(host="r"))
    custom = load_config(queued(
        REDIS_URL="redis://r", MLRUN_QUEUE_STREAM="t:in", MLRUN_QUEUE_PARTITIONS="3",
        MLRUN_QUEUE_GROUP="g", MLRUN_QUEUE_MAX_ENTRIES="10", MLRUN_QUEUE_MAX_BYTES="1000",
        MLRUN_QUEUE_CLAIM_IDLE_S="2.5", PROCESSOR_HTTP_PORT="0", MLRUN_PROCESSOR_NAME="p1",
        MLRUN_PROCESSOR_READ_ENTRIES="50")).queue
    assert (custom.stream, custom.partitions, custom.group, custom.max_entries,
            custom.max_bytes, custom.claim_idle_s, custom.processor_http_port,
            custom.processor_name, custom.processor_read_entries) == (
        "t:in", 3, "g", 10, 1000, 2.5, 0, "p1", 50)
    for name, bad in (("MLRUN_QUEUE_PARTITIONS", "0"), ("MLRUN_QUEUE_STREAM", "a b"),
                      ("PROCESSOR_HTTP_PORT", "99999"), ("MLRUN_QUEUE_CLAIM_IDLE_S", "-1")):
        with pytest.raises(ConfigError, match=rf"^{name}:"):
            load_config(queued(REDIS_URL="redis://r", **{name: bad}))


def test_queued_mode_needs_shared_database_servers() -> None:
    with pytest.raises(ConfigError, match=r"^CLICKHOUSE_HOST:"):
        load_config({"INGEST_MODE": "queued", "REDIS_URL": "redis://r",
                     "DATABASE_URL": SERVERS["DATABASE_URL"]})
    with pytest.raises(ConfigError, match=r"^DATABASE_URL:"):
        load_config({"INGEST_MODE": "queued", "REDIS_URL": "redis://r", "CLICKHOUSE_HOST": "c"})


def test_the_processor_needs_queued_mode() -> None:
    check_processor_config(load_config(queued(REDIS_URL="redis://r")))
    with pytest.raises(ConfigError, match=r"^INGEST_MODE:"):
        check_processor_config(load_config({}))


@pytest.mark.parametrize(("command", "env", "name"), [
    ("serve", {"INGEST_MODE": "queued"}, "REDIS_URL"),
    ("serve", queued(REDIS_URL="redis://:hunter2@r:x"), "REDIS_URL"),
    ("process", {}, "INGEST_MODE"),
    ("process", {"INGEST_MODE": "queued"}, "REDIS_URL"),
])
def test_a_bad_queue_setting_exits_2_with_one_line_naming_it(
    command: str, env: dict[str, str], name: str, tmp_path: Path,
) -> None:
    process = ServerProcess(env, tmp_path / "out.log", command=command)
    assert process.run_to_exit(timeout_s=30) == 2
    lines = [line for line in process.log_text().splitlines() if line.strip()]
    assert len(lines) == 1 and f"{name}:" in lines[0], lines
    assert "hunter2" not in lines[0]


def test_the_queued_compose_file_runs_two_servers_two_processors_and_haproxy() -> None:
    import re
    import subprocess

    import yaml

    from mlrun.server.runtime.config import known_variables

    deploy = Path(__file__).resolve().parent.parent / "deploy"
    text = (deploy / "compose.queued.yaml").read_text()
    services = yaml.safe_load(text)["services"]
    mlrun_services = {name: s for name, s in services.items() if "environment" in s
                      and "INGEST_MODE" in s["environment"]}
    assert sorted(mlrun_services) == ["mlrun-a", "mlrun-b", "processor-a", "processor-b"]
    for name, service in mlrun_services.items():
        environment = service["environment"]
        assert set(environment) <= known_variables(), name
        assert environment["INGEST_MODE"] == "queued"
        for secret in ("MLRUN_API_KEY", "CLICKHOUSE_PASSWORD", "MINIO_SECRET_KEY"):
            assert str(environment[secret]).startswith("${"), f"{name}: {secret}"
        assert "${REDIS_PASSWORD}" in environment["REDIS_URL"]
        filled = {k: re.sub(r"\$\{[^}]*\}", "x", str(v)) for k, v in environment.items()}
        assert load_config(filled).ingest.mode == "queued", name
    assert services["processor-a"]["entrypoint"] == ["mlrun", "process"]
    assert services["processor-a"]["environment"]["PROCESSOR_HTTP_PORT"] == "3002"
    assert "mlrun-a" in services["haproxy"]["depends_on"]
    assert "--appendonly" in services["redis"]["command"]
    assert "noeviction" in services["redis"]["command"]
    example = (deploy / "example.env").read_text()
    referenced = set(re.findall(r"\$\{([A-Z_]+)", text))
    defined = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    assert referenced <= defined, f"env file lacks {referenced - defined}"
    checked = subprocess.run(["haproxy", "-c", "-f", str(deploy / "haproxy.cfg")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
