"""Settings: CLI flags win over APPLIANCE_* environment variables, which win over defaults."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from appliance.cli import _parser
from appliance.settings import ENV_PREFIX, FIELD_DOCS, Settings, load_settings


def test_defaults_without_environment() -> None:
    settings = load_settings({}, environ={})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.data_dir == Path("data")
    assert settings.models_dir == Path("models")
    assert settings.max_body_bytes == 8 * 1024 * 1024


def test_environment_values_are_converted() -> None:
    env = {
        "APPLIANCE_PORT": "9001",
        "APPLIANCE_HOST": "0.0.0.0",
        "APPLIANCE_DATA_DIR": "/srv/appliance",
        "APPLIANCE_THREADS": "3",
        "APPLIANCE_REQUEST_TIMEOUT": "2.5",
        "APPLIANCE_LOG_LEVEL": "debug",
    }
    settings = load_settings({}, environ=env)
    assert settings.port == 9001
    assert settings.host == "0.0.0.0"
    assert settings.data_dir == Path("/srv/appliance")
    assert isinstance(settings.data_dir, Path)
    assert settings.threads == 3
    assert settings.request_timeout == 2.5
    assert settings.log_level == "debug"


def test_cli_beats_environment_beats_default() -> None:
    env = {"APPLIANCE_PORT": "9001", "APPLIANCE_THREADS": "3"}
    settings = load_settings({"port": 9002, "ctx_size": None}, environ=env)
    assert settings.port == 9002  # flag over env
    assert settings.threads == 3  # env over default
    assert settings.ctx_size == Settings().ctx_size  # flag not given (None): default


def test_empty_environment_values_are_ignored() -> None:
    assert load_settings({}, environ={"APPLIANCE_PORT": ""}).port == 8000


def test_unrelated_environment_is_ignored() -> None:
    env = {"APPLIANCE_NOT_A_SETTING": "x", "PORT": "1", "port": "2"}
    assert load_settings({}, environ=env) == Settings()


def test_process_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_PORT", "8123")
    assert load_settings().port == 8123
    assert load_settings({"port": 8124}).port == 8124


@pytest.mark.parametrize(
    ("name", "value"),
    [("PORT", "abc"), ("THREADS", "1.5x"), ("LOG_LEVEL", "loud"), ("FLASH_ATTN", "maybe")],
)
def test_invalid_environment_value_names_the_setting(name: str, value: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        load_settings({}, environ={ENV_PREFIX + name: value})
    assert name.lower() in str(info.value)


def test_every_setting_is_documented_and_a_serve_flag() -> None:
    parser = _parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {opt for action in serve._actions for opt in action.option_strings}
    for name in Settings.__struct_fields__:
        assert FIELD_DOCS.get(name), f"{name} has no docstring"
        assert "--" + name.replace("_", "-") in flags, f"serve has no flag for {name}"
