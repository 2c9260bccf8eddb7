"""The example configuration files are valid: every key known, every value well formed."""

from __future__ import annotations

import pathlib

import pytest

from rawproxy.cli import build_config, load_config_file

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(path: pathlib.Path) -> None:
    config = build_config(load_config_file(str(path)))
    assert config.listen
    assert config.routes


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"openqa.toml", "routes.toml"} <= names
