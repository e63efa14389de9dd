"""The service configuration: defaults that work, environment overrides, located errors."""

from __future__ import annotations

import pytest

from pricing.yaml_source import SourceError
from proxy.config import load_config


def test_bundled_config_loads_on_the_embedded_store():
    config = load_config(environ={})
    assert config.redis_url is None and config.admin_keys and "openai" in config.upstreams


def test_environment_overrides_the_file():
    config = load_config(environ={
        "METERGATE_REDIS_URL": "redis://10.0.0.1:6379/2", "METERGATE_ADMIN_KEY": "a,b", "METERGATE_PORT": "9000",
        "METERGATE_UPSTREAM_OPENAI_BASE_URL": "http://127.0.0.1:8100/v1",
    })
    assert config.redis_url == "redis://10.0.0.1:6379/2"
    assert config.admin_keys == ["a", "b"] and config.port == 9000
    assert config.upstreams["openai"].base_url == "http://127.0.0.1:8100/v1"


def test_a_bad_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "metergate.yaml"
    path.write_text("host: 127.0.0.1\nport: 8080\nhold_ttl_seconds: -5\n")
    with pytest.raises(SourceError) as err:
        load_config(path, environ={})
    [issue] = err.value.issues
    assert (issue.file, issue.line, issue.field) == (str(path), 3, "hold_ttl_seconds")


def test_an_unknown_field_is_refused_with_its_line(tmp_path):
    path = tmp_path / "metergate.yaml"
    path.write_text("host: 127.0.0.1\nupstreams:\n  openai:\n    base_url: http://x\n    api_key: sk-oops\n")
    with pytest.raises(SourceError) as err:
        load_config(path, environ={})
    [issue] = err.value.issues
    assert (issue.line, issue.field, issue.message) == (5, "upstreams.openai.api_key", "unknown field")


def test_a_bad_environment_value_is_named(tmp_path):
    with pytest.raises(SourceError) as err:
        load_config(environ={"METERGATE_PORT": "eighty"})
    assert "METERGATE_PORT" in str(err.value)


def test_a_closed_hold_record_shorter_than_the_close_retries_is_refused(tmp_path):
    # A close is retried for up to an hour; a record gone before that could not replay it.
    path = tmp_path / "metergate.yaml"
    path.write_text("host: 127.0.0.1\nclosed_hold_ttl_seconds: 600\n")
    with pytest.raises(SourceError) as err:
        load_config(path, environ={})
    [issue] = err.value.issues
    assert (issue.line, issue.field) == (2, "closed_hold_ttl_seconds")
