"""Configuration parsing: defaults, every variable's validation, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlrun.server.errors import ConfigError
from mlrun.server.runtime.config import Config, Secret, known_variables, load_config


def test_defaults_select_embedded_backends() -> None:
    config = load_config({})
    assert config == Config()
    assert config.listen.http_port == 3001 and config.listen.grpc_port == 50051
    assert config.postgres.dsn is None
    assert config.clickhouse.host is None
    assert config.artifacts.endpoint is None
    assert config.data_dir == Path("mlrun-data")
    assert config.cardinality.max_metric_names_per_run == 1000


def test_full_production_environment() -> None:
    config = load_config(
        {
            "API_HOST": "0.0.0.0",
            "API_HTTP_PORT": "8080",
            "API_GRPC_PORT": "0",
            "MLRUN_API_KEY": "mlrun_bootstrap",
            "DATABASE_URL": "postgresql://u:pw@db:5432/mlrun",
            "CLICKHOUSE_HOST": "ch",
            "CLICKHOUSE_PORT": "8123",
            "CLICKHOUSE_USER": "mlrun",
            "CLICKHOUSE_PASSWORD": "chpw",
            "MINIO_ENDPOINT": "minio:9000",
            "MINIO_ACCESS_KEY": "ak",
            "MINIO_SECRET_KEY": "sk",
            "MLRUN_MAX_TAG_KEYS_PER_RUN": "7",
        }
    )
    assert config.listen.host == "0.0.0.0" and config.listen.grpc_port == 0
    assert config.postgres.dsn == Secret("postgresql://u:pw@db:5432/mlrun")
    assert config.clickhouse.host == "ch" and config.clickhouse.password.value == "chpw"
    assert config.artifacts.endpoint == "http://minio:9000"
    assert config.cardinality.max_tag_keys_per_run == 7


def test_secrets_never_appear_in_repr() -> None:
    config = load_config(
        {
            "MLRUN_API_KEY": "mlrun_supersecret",
            "DATABASE_URL": "postgresql://u:dbsecret@db/mlrun",
            "CLICKHOUSE_PASSWORD": "chsecret",
            "MINIO_ENDPOINT": "http://m:9000",
            "MINIO_ACCESS_KEY": "ak",
            "MINIO_SECRET_KEY": "s3secret",
        }
    )
    text = repr(config) + str(config)
    for secret in ("supersecret", "dbsecret", "chsecret", "s3secret"):
        assert secret not in text


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("API_HTTP_PORT", "abc"),
        ("API_HTTP_PORT", "70000"),
        ("API_GRPC_PORT", "-1"),
        ("API_HOST", "a b"),
        ("CLICKHOUSE_PORT", "x"),
        ("MLRUN_AUTH_DISABLED", "maybe"),
        ("MLRUN_MAX_TAG_KEYS_PER_RUN", "0"),
        ("MLRUN_MAX_METRIC_NAMES_PER_RUN", "many"),
        ("MLRUN_MAX_TAGS_PER_PROJECT", "-3"),
        ("DATABASE_URL", "mysql://x@y/z"),
        ("MINIO_ENDPOINT", "ftp://host"),
        ("INGEST_MODE", "turbo"),
        ("MLRUN_LOG_LEVEL", "loud"),
        ("MLRUN_LOG_FORMAT", "xml"),
        ("CLICKHOUSE_DATABASE", "bad-name"),
        ("MLRUN_SHUTDOWN_TIMEOUT_S", "0"),
    ],
)
def test_bad_value_names_the_variable_in_one_line(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({variable: value})
    message = str(caught.value)
    assert message.startswith(f"{variable}:")
    assert "\n" not in message


def test_database_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"DATABASE_URL": "mysql://user:topsecret@host/db"})
    assert "topsecret" not in str(caught.value)


def test_auth_disabled_only_on_loopback() -> None:
    assert load_config({"MLRUN_AUTH_DISABLED": "true"}).auth.disabled
    assert load_config({"MLRUN_AUTH_DISABLED": "1", "API_HOST": "::1"}).auth.disabled
    with pytest.raises(ConfigError, match=r"^MLRUN_AUTH_DISABLED:"):
        load_config({"MLRUN_AUTH_DISABLED": "true", "API_HOST": "0.0.0.0"})


def test_minio_endpoint_needs_credentials() -> None:
    with pytest.raises(ConfigError, match=r"^MINIO_ACCESS_KEY:"):
        load_config({"MINIO_ENDPOINT": "http://m:9000"})


def test_queued_mode_needs_a_redis_url() -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_URL:"):
        load_config({"INGEST_MODE": "queued"})


def test_database_url_accepts_uri_and_key_value_forms() -> None:
    conninfo = "host=127.0.0.1 port=5433 dbname=mlrun password='a b'"
    assert load_config({"DATABASE_URL": conninfo}).postgres.dsn == Secret(conninfo)
    with pytest.raises(ConfigError, match=r"^DATABASE_URL:"):
        load_config({"DATABASE_URL": "just-a-word"})


def test_empty_values_count_as_unset() -> None:
    assert load_config({"DATABASE_URL": "", "API_HTTP_PORT": ""}) == Config()


def test_readme_documents_every_variable_the_server_reads() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    undocumented = sorted(name for name in known_variables() if f"`{name}`" not in readme)
    assert not undocumented, f"README's configuration table lacks {undocumented}"
