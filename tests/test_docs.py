"""Documentation stays true: every setting and CLI command is in the README."""

from __future__ import annotations

from pathlib import Path

from appliance.settings import FIELD_DOCS, Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    for name in Settings.__struct_fields__:
        assert FIELD_DOCS.get(name), f"setting {name} has no docstring"
        assert f"APPLIANCE_{name.upper()}" in README, f"README does not document {name}"


def test_readme_opens_with_the_two_commands() -> None:
    block = README.split("```sh", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].endswith("appliance serve")
    assert "pytest" in block[1]
    assert block[1] in (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
