"""The command line: ``keys create|list|revoke``, ``models list``, settings precedence, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.cli import main
from appliance.engine.registry import embedded_model_path, model_id_for
from appliance.store.keyformat import is_well_formed
from tests.conftest import make_settings
from tests.fakes import FakeEngine
from tests.helpers import wait_for
from tests.support.models import smollm2_path

ROOT = Path(__file__).resolve().parent.parent
KEY_FIELDS = {"name", "prefix", "created", "revoked", "prompt_tokens", "completion_tokens",
              "balance"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m appliance ARGS`` in a clean environment (plus ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop whatever earlier code printed
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def keys_json(capsys: pytest.CaptureFixture[str], data_dir: Path) -> dict[str, dict[str, Any]]:
    code, out, _ = run_main(capsys, "keys", "list", "--json", "--data-dir", str(data_dir))
    assert code == 0
    return {k["name"]: k for k in json.loads(out)}


# -- keys ------------------------------------------------------------------------------------


def test_keys_create_prints_the_key_alone_on_the_last_line(tmp_path: Path) -> None:
    result = cli("keys", "create", "alice", "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) >= 2
    key = lines[-1]
    assert key == key.strip() and " " not in key
    assert is_well_formed(key)
    assert key not in "\n".join(lines[:-1])  # shown exactly once
    assert "alice" in result.stdout


def test_keys_create_list_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run_main(capsys, "keys", "create", "alice", "--data-dir", str(tmp_path))
    assert code == 0
    key = out.splitlines()[-1]
    run_main(capsys, "keys", "create", "bob", "--data-dir", str(tmp_path))
    code, out, _ = run_main(capsys, "keys", "list", "--json", "--data-dir", str(tmp_path))
    assert code == 0
    listed = json.loads(out)
    assert [k["name"] for k in listed] == ["alice", "bob"]
    alice = listed[0]
    assert set(alice) >= KEY_FIELDS
    assert key.startswith(alice["prefix"])
    assert key not in out
    assert alice["revoked"] is False
    assert alice["prompt_tokens"] == 0 and alice["completion_tokens"] == 0
    assert alice["balance"] is None
    assert alice["created"].endswith("Z")


def test_keys_list_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_main(capsys, "keys", "create", "alice", "--data-dir", str(tmp_path))
    code, out, _ = run_main(capsys, "keys", "list", "--data-dir", str(tmp_path))
    assert code == 0
    header, row = out.splitlines()
    assert header.split()[:2] == ["NAME", "PREFIX"]
    assert row.split()[0] == "alice"


def test_keys_list_empty(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert keys_json(capsys, tmp_path) == {}


def test_keys_revoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_main(capsys, "keys", "create", "alice", "--data-dir", str(tmp_path))
    code, out, err = run_main(capsys, "keys", "revoke", "alice", "--data-dir", str(tmp_path))
    assert code == 0, err
    assert "alice" in out
    keys = keys_json(capsys, tmp_path)
    assert keys["alice"]["revoked"] is True


def test_keys_revoke_unknown_fails_with_one_line(tmp_path: Path) -> None:
    result = cli("keys", "revoke", "nobody", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "nobody" in lines[0]


def test_keys_create_duplicate_fails_with_one_line(tmp_path: Path) -> None:
    assert cli("keys", "create", "alice", "--data-dir", str(tmp_path)).returncode == 0
    result = cli("keys", "create", "alice", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "alice" in lines[0]


def test_usage_shows_in_keys_list(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = make_settings(tmp_path)
    code, out, _ = run_main(capsys, "keys", "create", "alice", "--data-dir",
                            str(settings.data_dir))
    assert code == 0
    key = out.splitlines()[-1]
    engine = FakeEngine()
    totals = {"prompt_tokens": 0, "completion_tokens": 0}
    with TestClient(create_app(settings, engine_factory=lambda _: engine)) as client:
        wait_for(lambda: engine.ready)
        for max_tokens in (2, 4, 100):
            response = client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert response.status_code == 200
            for name in totals:
                totals[name] += response.json()["usage"][name]
    # The app has shut down, so every usage write has landed.
    alice = keys_json(capsys, settings.data_dir)["alice"]
    assert alice["prompt_tokens"] == totals["prompt_tokens"] > 0
    assert alice["completion_tokens"] == totals["completion_tokens"] == 2 + 4 + 8


# -- models ----------------------------------------------------------------------------------


def test_models_list_json_finds_dropped_gguf_and_embedded(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    target = models / "My-Model.Q4.gguf"
    try:
        target.symlink_to(smollm2_path())
    except OSError:
        shutil.copyfile(smollm2_path(), target)
    (models / "notes.txt").write_text("not a model")
    code, out, _ = run_main(capsys, "models", "list", "--json", "--models-dir", str(models))
    assert code == 0
    found = {m["id"]: m for m in json.loads(out)}
    assert "my-model.q4" in found
    mine = found["my-model.q4"]
    assert mine["embedded"] is False
    assert mine["architecture"] == "llama"
    assert mine["context_length"] > 0
    assert mine["size_bytes"] == smollm2_path().stat().st_size
    embedded = embedded_model_path()
    assert embedded is not None
    embedded_id = model_id_for(embedded)
    assert found[embedded_id]["embedded"] is True
    assert len(found) == 2


def test_models_list_table_without_models_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run_main(capsys, "models", "list", "--models-dir", str(tmp_path / "none"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[0] == "ID"
    assert any("embedded" in line for line in lines[1:])


# -- settings precedence and errors ----------------------------------------------------------


def test_data_dir_flag_beats_environment(tmp_path: Path) -> None:
    from_env, from_flag = tmp_path / "env", tmp_path / "flag"
    env = {"APPLIANCE_DATA_DIR": str(from_env)}
    assert cli("keys", "create", "via-env", env=env).returncode == 0
    assert cli("keys", "create", "via-flag", "--data-dir", str(from_flag), env=env).returncode == 0

    def names(*args: str) -> list[str]:
        result = cli("keys", "list", "--json", *args, env=env)
        assert result.returncode == 0, result.stderr
        return [k["name"] for k in json.loads(result.stdout)]

    assert names() == ["via-env"]
    assert names("--data-dir", str(from_flag)) == ["via-flag"]
    assert (from_env / "appliance.db").is_file() and (from_flag / "appliance.db").is_file()


def test_default_data_dir_is_relative_to_cwd(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_main(capsys, "keys", "create", "alice")
    assert code == 0
    assert (tmp_path / "data" / "appliance.db").is_file()


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"APPLIANCE_PORT": "abc"}, ("keys", "list")),
        ({"APPLIANCE_THREADS": "many"}, ("models", "list")),
        ({"APPLIANCE_LOG_LEVEL": "loud"}, ("keys", "list")),
    ],
)
def test_invalid_env_value_fails_with_one_line(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...]
) -> None:
    result = cli(*args, "--data-dir" if args[0] == "keys" else "--models-dir", str(tmp_path),
                 env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    name = next(iter(env)).removeprefix("APPLIANCE_").lower()
    assert name in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_command_is_a_usage_error(tmp_path: Path) -> None:
    result = cli("frobnicate")
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()


def test_help_lists_the_commands() -> None:
    result = cli("--help")
    assert result.returncode == 0
    for command in ("serve", "keys", "models"):
        assert command in result.stdout
    serve = cli("serve", "--help")
    assert serve.returncode == 0
    for flag in ("--port", "--data-dir", "--models-dir", "--threads", "--ctx-size",
                 "--parallel", "APPLIANCE_PORT"):
        assert flag in serve.stdout
